//! Request priorities (`--priority-levels N`): levels numbered as Triton numbers them, 1 the
//! highest and N the lowest, with 0 meaning "the default". A request names its level with
//! `?priority=` or a `Priority` header (`/v1`, v2 REST), v2's `priority` parameter, or gRPC
//! `priority` metadata; an API key may cap it (`priority=` in `--api-keys-file`).
//!
//! What a level changes, and where:
//! - the model's queue (`batching::queue`) keeps images in level order, so a batch fills from
//!   the highest level first, and only the highest level may wait prepared in the hand-off
//!   slot ahead of a running batch;
//! - admission (`backend::ModelHandle::admit`): level L is admitted only while the model has
//!   fewer than its limit of images in flight (`--priority-queue-images`, falling by level by
//!   default), so that a flood at a low level is refused (429) while the levels above it still
//!   find room;
//! - the request's time limit (`--priority-request-timeout`, else `--request-timeout`).
//!
//! With one level (the default) every request is at it, and a priority a client sends is
//! accepted and ignored: nothing changes from a server without priorities.

use std::time::Duration;

/// The most levels a server may have.
pub const MAX_LEVELS: usize = 8;

/// A priority level as the server keeps it: 0 is the highest (level 1 as clients number it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level(u8);

impl Level {
    pub const HIGHEST: Level = Level(0);

    /// The level clients call `number` (1 = highest); `None` for 0 or past [`MAX_LEVELS`].
    pub fn from_number(number: u64) -> Option<Level> {
        (1..=MAX_LEVELS as u64)
            .contains(&number)
            .then(|| Level(number as u8 - 1))
    }

    /// Position in per-level tables: 0 for the highest.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// As clients number it: 1 for the highest.
    pub fn number(self) -> u64 {
        self.0 as u64 + 1
    }
}

/// The levels a server has, and what each allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Levels {
    count: usize,
    default: Level,
    /// Level i is admitted while a model has fewer images than this in flight.
    queue_images: [usize; MAX_LEVELS],
    /// The longest a request at level i may take (a client may ask for less).
    timeouts: [Duration; MAX_LEVELS],
}

impl Levels {
    /// One level: today's behaviour, every request at it.
    pub fn single(max_queue_images: usize, request_timeout: Duration) -> Self {
        Self::new(1, 1, &[], &[], max_queue_images, request_timeout)
            .expect("one level is always valid")
    }

    /// `count` levels with `default` (1-based) for requests that name none. `queue_images`
    /// and `timeouts` give each level's limits, highest first, or are empty for the defaults:
    /// level L of N may fill the queue to `max_queue_images * (N - L + 1) / N`, and every level
    /// has `request_timeout`.
    pub fn new(
        count: usize,
        default: u64,
        queue_images: &[usize],
        timeouts: &[Duration],
        max_queue_images: usize,
        request_timeout: Duration,
    ) -> Result<Self, String> {
        if !(1..=MAX_LEVELS).contains(&count) {
            return Err(format!(
                "--priority-levels must be between 1 and {MAX_LEVELS}, not {count}"
            ));
        }
        let default = Level::from_number(default)
            .filter(|level| level.index() < count)
            .ok_or_else(|| {
                format!(
                    "--default-priority must be a level between 1 (highest) and {count} \
                     (lowest), not {default}"
                )
            })?;
        check_one_per_level("--priority-queue-images", queue_images.len(), count)?;
        check_one_per_level("--priority-request-timeout", timeouts.len(), count)?;
        let mut levels = Self {
            count,
            default,
            queue_images: [max_queue_images; MAX_LEVELS],
            timeouts: [request_timeout; MAX_LEVELS],
        };
        for i in 0..count {
            levels.queue_images[i] = match queue_images.get(i) {
                Some(&limit) if limit == 0 || limit > max_queue_images => {
                    return Err(format!(
                        "--priority-queue-images: level {} has {limit}; each level's limit must \
                         be between 1 and --max-queue-images ({max_queue_images})",
                        i + 1
                    ))
                }
                Some(&limit) => limit,
                None => (max_queue_images * (count - i) / count).max(1),
            };
            if let Some(&timeout) = timeouts.get(i) {
                if timeout.is_zero() || timeout > request_timeout {
                    return Err(format!(
                        "--priority-request-timeout: level {} has {} s; each level's timeout \
                         must be between 1 s and --request-timeout ({} s)",
                        i + 1,
                        timeout.as_secs(),
                        request_timeout.as_secs()
                    ));
                }
                levels.timeouts[i] = timeout;
            }
        }
        Ok(levels)
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// More than one level: priorities change something.
    pub fn enabled(&self) -> bool {
        self.count > 1
    }

    pub fn default_level(&self) -> Level {
        self.default
    }

    /// The images a model may have in flight when a request at `level` is admitted.
    pub fn queue_images(&self, level: Level) -> usize {
        self.queue_images[level.index().min(self.count - 1)]
    }

    /// The longest a request at `level` may take.
    pub fn timeout(&self, level: Level) -> Duration {
        self.timeouts[level.index().min(self.count - 1)]
    }

    /// Every level, highest first.
    pub fn all(&self) -> impl Iterator<Item = Level> {
        (0..self.count as u8).map(Level)
    }

    /// The level of a request that asked for `asked` (its number: 1 = highest, 0 or `None`:
    /// the default) under a key capped at `cap`: never above the cap, which is also the
    /// default for the key's requests. With one level everything is level 1, whatever was
    /// asked.
    pub fn resolve(&self, asked: Option<u64>, cap: Option<Level>) -> Result<Level, String> {
        if !self.enabled() {
            return Ok(Level::HIGHEST);
        }
        // A key's level past the last one means the last one.
        let lowest = Level(self.count as u8 - 1);
        let cap = cap.map(|cap| cap.min(lowest));
        let default = cap.unwrap_or(self.default);
        let level = match asked {
            None | Some(0) => default,
            Some(number) => Level::from_number(number)
                .filter(|level| level.index() < self.count)
                .ok_or_else(|| self.out_of_range(number))?,
        };
        Ok(cap.map_or(level, |cap| level.max(cap)))
    }

    fn out_of_range(&self, number: u64) -> String {
        format!(
            "priority must be a level between 1 (highest) and {} (lowest), or 0 for the \
             default ({}), not {number}",
            self.count,
            self.default.number()
        )
    }
}

fn check_one_per_level(flag: &str, given: usize, count: usize) -> Result<(), String> {
    if given == 0 || given == count {
        Ok(())
    } else {
        Err(format!(
            "{flag} gives {given} values for {count} priority levels: give one per level, \
             highest first (comma-separated), or none for the defaults"
        ))
    }
}

/// A priority as a client writes it in a query, header or metadata: a whole number. An HTTP
/// `Priority` header in RFC 9218's form (`u=3, i`, sent by browsers and proxies) is about
/// transport scheduling, not ours, and is ignored (`Ok(None)`).
pub fn parse(text: &str) -> Result<Option<u64>, String> {
    let text = text.trim();
    // RFC 9218's Priority is a dictionary of `u` (urgency) and `i` (incremental).
    let transport = text.split(',').all(|member| {
        let key = member.trim().split('=').next().unwrap_or_default();
        key == "u" || key == "i"
    });
    if transport {
        return Ok(None);
    }
    text.parse::<u64>().map(Some).map_err(|_| {
        format!(
            "priority must be a whole number (1 = the highest level, 0 = the default), not \
             {text:?}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn one_level_ignores_what_clients_ask() {
        let levels = Levels::single(256, MINUTE);
        assert!(!levels.enabled());
        for asked in [None, Some(0), Some(1), Some(7), Some(1000)] {
            assert_eq!(levels.resolve(asked, None), Ok(Level::HIGHEST));
        }
        assert_eq!(levels.queue_images(Level::HIGHEST), 256);
    }

    #[test]
    fn lower_levels_fill_less_of_the_queue_by_default() {
        let levels = Levels::new(4, 1, &[], &[], 256, MINUTE).unwrap();
        let limits: Vec<usize> = levels.all().map(|l| levels.queue_images(l)).collect();
        assert_eq!(limits, [256, 192, 128, 64]);
        let given = Levels::new(2, 2, &[200, 20], &[MINUTE, MINUTE / 6], 256, MINUTE).unwrap();
        assert_eq!(given.queue_images(Level(1)), 20);
        assert_eq!(given.timeout(Level(1)), Duration::from_secs(10));
        assert_eq!(given.default_level(), Level(1));
    }

    #[test]
    fn a_key_caps_the_level_and_is_its_default() {
        let levels = Levels::new(3, 1, &[], &[], 256, MINUTE).unwrap();
        assert_eq!(levels.resolve(None, None), Ok(Level(0)));
        assert_eq!(levels.resolve(Some(3), None), Ok(Level(2)));
        assert_eq!(levels.resolve(None, Some(Level(1))), Ok(Level(1)));
        assert_eq!(levels.resolve(Some(1), Some(Level(1))), Ok(Level(1)));
        assert_eq!(levels.resolve(Some(3), Some(Level(1))), Ok(Level(2)));
        assert_eq!(levels.resolve(Some(1), Some(Level(7))), Ok(Level(2)));
        let err = levels.resolve(Some(4), None).unwrap_err();
        assert!(err.contains("between 1 (highest) and 3 (lowest)"), "{err}");
    }

    #[test]
    fn bad_settings_name_the_flag_and_what_is_accepted() {
        let err = Levels::new(9, 1, &[], &[], 256, MINUTE).unwrap_err();
        assert!(err.contains("--priority-levels"), "{err}");
        let err = Levels::new(2, 3, &[], &[], 256, MINUTE).unwrap_err();
        assert!(err.contains("--default-priority"), "{err}");
        let err = Levels::new(3, 1, &[10, 5], &[], 256, MINUTE).unwrap_err();
        assert!(err.contains("one per level"), "{err}");
        let err = Levels::new(2, 1, &[300, 5], &[], 256, MINUTE).unwrap_err();
        assert!(err.contains("--max-queue-images (256)"), "{err}");
        let err = Levels::new(2, 1, &[], &[MINUTE * 2, MINUTE], 256, MINUTE).unwrap_err();
        assert!(err.contains("--request-timeout (60 s)"), "{err}");
    }

    #[test]
    fn priorities_parse_as_numbers_and_rfc_9218_is_ignored() {
        assert_eq!(parse(" 2 "), Ok(Some(2)));
        assert_eq!(parse("0"), Ok(Some(0)));
        assert_eq!(parse("u=1, i"), Ok(None));
        assert_eq!(parse("u=3"), Ok(None));
        assert!(parse("high").unwrap_err().contains("whole number"));
        assert!(parse("-1").is_err());
        assert!(
            parse("1,2").is_err(),
            "not a transport priority, not a level"
        );
    }
}
