//! `--config visionserve.toml`: every flag of `serve` as a key, and `[models.NAME]` sections.
//!
//! The file's values become the defaults of the command's arguments, so clap's own precedence
//! does the rest: the command line over the environment over the file over the built-in
//! default. Each value is checked with its flag's own parser before anything starts, and an
//! error names the file, the line and the key, with the values the flag accepts.
//!
//! A key is its flag's long name with `_` for `-` (`--max-batch-size` is `max_batch_size`);
//! repeatable flags (`model`, `api_key`) take arrays. A `[models.NAME]` section is a `--model
//! NAME=SOURCE?options` written out: `source` plus any model option (`dtype`, `backend`,
//! `max_batch_size`, `max_batch_delay_ms`, `instances`, `jpeg_draft`, `input_size`, `arch`).

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use toml::{Spanned, Value};

/// The flag that names the file, and its environment variable.
pub const FLAG: &str = "config";
pub const ENV: &str = "VISIONSERVE_CONFIG";

/// Checks a `--model` spec (the repository's parser: this leaf cannot import it).
pub type ModelCheck<'a> = &'a dyn Fn(&str) -> Result<(), String>;

/// A read and checked configuration file: each flag it sets, with the line that set it.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// Argument id -> (its values as the command line would write them, the line).
    values: BTreeMap<String, (Vec<String>, usize)>,
}

/// The `--config` path on a command line (`--config F` or `--config=F`), else `$VISIONSERVE_CONFIG`.
/// Read before clap parses, because the file's values are defaults clap must already know.
pub fn requested_path(args: &[OsString]) -> Option<PathBuf> {
    let flag = format!("--{FLAG}");
    let mut args = args.iter().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--" {
            break;
        }
        if text == flag {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix(&format!("{flag}=")) {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The TOML key for an argument: its long name with `_` for `-`.
pub fn key_of(arg: &Arg) -> Option<String> {
    let long = arg.get_long()?;
    // `config --print`'s own switches are not settings.
    let not_settings = ["help", "version", FLAG, "print", "defaults"];
    (!not_settings.contains(&long)).then(|| long.replace('-', "_"))
}

fn is_flag(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
}

fn is_repeatable(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

fn is_secret(arg: &Arg) -> bool {
    arg.is_hide_env_values_set()
}

impl ConfigFile {
    /// Read `path` and check every key and value against `command`'s arguments;
    /// `check_model` checks each `[models.NAME]` section as the `--model` spec it becomes.
    pub fn read(path: &Path, command: &Command, check_model: ModelCheck) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the configuration file {}: {e}", path.display()))?;
        Self::parse(path, &text, command, check_model)
    }

    pub fn parse(
        path: &Path,
        text: &str,
        command: &Command,
        check_model: ModelCheck,
    ) -> Result<Self, String> {
        let at = |line: usize| format!("{}:{line}", path.display());
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let table: BTreeMap<String, Spanned<Value>> = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(s.start));
            format!("{}: not valid TOML: {}", at(line), e.message())
        })?;
        let args = keyed_args(command);
        let mut values = BTreeMap::new();
        let mut models = Vec::new();
        for (key, value) in &table {
            let line = line_of(value.span().start);
            if key == "models" {
                models = model_specs(text, value, &at, check_model)?;
                continue;
            }
            let arg = args.get(key.as_str()).ok_or_else(|| {
                format!(
                    "{}: unknown key `{key}`{}; `visionserve config --print --defaults` lists every key",
                    at(line),
                    suggestion(key, args.keys().map(String::as_str))
                )
            })?;
            let written = as_arguments(arg, value.get_ref())
                .map_err(|e| format!("{}: key `{key}`: {e}", at(line)))?;
            for one in &written {
                check_value(arg, one).map_err(|e| format!("{}: key `{key}`: {e}", at(line)))?;
            }
            values.insert(arg.get_id().to_string(), (written, line));
        }
        if !models.is_empty() {
            let model = args["model"];
            let (mut given, line) = values.remove(model.get_id().as_str()).unwrap_or_default();
            let first_line = models.iter().map(|(_, l)| *l).min().unwrap_or(line);
            given.extend(models.into_iter().map(|(spec, _)| spec));
            values.insert(model.get_id().to_string(), (given, first_line.max(line)));
        }
        Ok(Self {
            path: path.to_owned(),
            values,
        })
    }

    /// `command` with the file's values as its arguments' defaults, in every subcommand that
    /// takes them too (`serve`, `config`).
    pub fn apply(&self, command: Command) -> Command {
        let mut command = self.apply_here(command);
        let names: Vec<String> = command
            .get_subcommands()
            .filter(|sub| sub.get_arguments().any(|a| a.get_long() == Some(FLAG)))
            .map(|sub| sub.get_name().to_owned())
            .collect();
        for name in names {
            command = command.mut_subcommand(name, |sub| self.apply_here(sub));
        }
        command
    }

    fn apply_here(&self, command: Command) -> Command {
        // `mut_args` keeps the arguments in their order (`mut_arg` moves each to the end).
        command.mut_args(|arg| match self.values.get(arg.get_id().as_str()) {
            Some((values, _)) => arg.default_values(values.clone()),
            None => arg,
        })
    }

    /// Where the value of argument `id` came from, when the file set it.
    pub fn line_of(&self, id: &str) -> Option<usize> {
        self.values.get(id).map(|(_, line)| *line)
    }
}

/// The arguments a file may set, by key.
fn keyed_args(command: &Command) -> BTreeMap<String, &Arg> {
    command
        .get_arguments()
        .filter_map(|arg| key_of(arg).map(|key| (key, arg)))
        .collect()
}

/// A TOML value as the command-line values of `arg`.
fn as_arguments(arg: &Arg, value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::Array(items) if is_repeatable(arg) => items.iter().map(scalar).collect(),
        Value::Array(_) => Err("takes one value, not an array".into()),
        Value::Boolean(_) if !is_flag(arg) => Err("takes a value, not true/false".into()),
        _ if is_flag(arg) && !matches!(value, Value::Boolean(_)) => {
            Err("is a switch: write true or false".into())
        }
        other => Ok(vec![scalar(other)?]),
    }
}

fn scalar(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        Value::Datetime(d) => Ok(d.to_string()),
        Value::Array(_) | Value::Table(_) => {
            Err("takes a plain value, not an array or table".into())
        }
    }
}

/// Run the flag's own parser (on a command of that flag alone, so that neither the
/// environment nor other flags play a part); its error lists the accepted values.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    if is_flag(arg) {
        return Ok(());
    }
    let long = format!("--{}", arg.get_long().unwrap_or_default());
    let alone = arg
        .clone()
        .required(false)
        .env(clap::builder::Resettable::Reset);
    Command::new("visionserve")
        .arg(alone)
        .try_get_matches_from(["visionserve".to_owned(), long, value.to_owned()])
        .map(drop)
        .map_err(|e| {
            let text = e.render().to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
                .collect();
            lines.join(" ").trim_start_matches("error: ").to_owned()
        })
}

/// `[models.NAME]` sections as `NAME=SOURCE?key=value&...` specs, each with its line.
fn model_specs(
    text: &str,
    value: &Spanned<Value>,
    at: &dyn Fn(usize) -> String,
    check_model: ModelCheck,
) -> Result<Vec<(String, usize)>, String> {
    #[derive(serde::Deserialize)]
    struct Sections {
        #[serde(default)]
        models: BTreeMap<String, BTreeMap<String, Spanned<Value>>>,
    }
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let sections: Sections = toml::from_str(text).map_err(|e| {
        format!(
            "{}: `models` must hold [models.NAME] sections: {}",
            at(line_of(value.span().start)),
            e.message()
        )
    })?;
    let mut specs = Vec::new();
    for (name, keys) in sections.models {
        let first = keys.values().map(|v| v.span().start).min().unwrap_or(0);
        let section_line = line_of(first).saturating_sub(1).max(1);
        let source = keys.get("source").ok_or_else(|| {
            format!(
                "{}: [models.{name}] needs `source` (a folder, a weights file or hf-hub:ORG/REPO)",
                at(section_line)
            )
        })?;
        let Value::String(source_text) = source.get_ref() else {
            return Err(format!(
                "{}: [models.{name}] `source` must be a string",
                at(line_of(source.span().start))
            ));
        };
        let mut options = Vec::new();
        for (key, value) in keys.iter().filter(|(k, _)| k.as_str() != "source") {
            let line = line_of(value.span().start);
            let written = scalar(value.get_ref())
                .map_err(|e| format!("{}: [models.{name}] `{key}` {e}", at(line)))?;
            check_model(&format!("{name}={source_text}?{key}={written}"))
                .map_err(|e| format!("{}: [models.{name}] key `{key}`: {e}", at(line)))?;
            options.push((key.clone(), written));
        }
        let query: Vec<String> = options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let spec = if query.is_empty() {
            format!("{name}={source_text}")
        } else {
            format!("{name}={source_text}?{}", query.join("&"))
        };
        check_model(&spec).map_err(|e| format!("{}: [models.{name}]: {e}", at(section_line)))?;
        specs.push((spec, section_line));
    }
    Ok(specs)
}

/// ` (did you mean `x`?)` for the closest key, when one is close.
fn suggestion<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> String {
    known
        .map(|k| (strsim::levenshtein(key, k), k))
        .filter(|(distance, k)| *distance <= 3.max(k.len() / 4))
        .min()
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Where each value came from, and the configuration written back out

/// `key=value (origin)` for every argument not at its built-in default.
pub fn origins(command: &Command, matches: &ArgMatches, file: Option<&ConfigFile>) -> Vec<String> {
    let mut lines = Vec::new();
    for arg in command.get_arguments() {
        let (Some(key), id) = (key_of(arg), arg.get_id().as_str()) else {
            continue;
        };
        let origin = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "command line".to_owned(),
            Some(ValueSource::EnvVariable) => {
                format!(
                    "${}",
                    arg.get_env()
                        .map_or(String::new(), |e| e.to_string_lossy().into_owned())
                )
            }
            Some(ValueSource::DefaultValue) => {
                match file.and_then(|f| f.line_of(id).map(|l| (f, l))) {
                    Some((file, line)) => format!("{}:{line}", file.path.display()),
                    None => continue,
                }
            }
            _ => continue,
        };
        lines.push(format!(
            "{key}={} ({origin})",
            shown(arg, raw_values(matches, id))
        ));
    }
    lines
}

fn raw_values(matches: &ArgMatches, id: &str) -> Vec<String> {
    matches
        .get_raw(id)
        .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn shown(arg: &Arg, values: Vec<String>) -> String {
    if is_secret(arg) {
        "<hidden>".into()
    } else {
        values.join(",")
    }
}

/// The effective configuration as a file `--config` reads back: every key with a value.
/// Secrets are left out (commented), so the output can be shared.
pub fn effective_toml(command: &Command, matches: &ArgMatches) -> String {
    let mut out =
        String::from("# visionserve's effective configuration (visionserve config --print)\n");
    for arg in command.get_arguments() {
        let Some(key) = key_of(arg) else { continue };
        let values = raw_values(matches, arg.get_id().as_str());
        if values.is_empty() {
            continue;
        }
        if is_secret(arg) {
            out.push_str(&format!("# {key} = <hidden: set>\n"));
            continue;
        }
        out.push_str(&format!("{key} = {}\n", toml_value(arg, &values)));
    }
    out
}

/// Every key with its default (commented where there is none) and its help text.
pub fn defaults_toml(command: &Command) -> String {
    let mut out = String::from(
        "# Every key of visionserve.toml, with its default and its help (visionserve config --print --defaults).\n\
         # Precedence: the command line, then VISIONSERVE_* variables, then this file, then the default.\n",
    );
    for arg in command.get_arguments() {
        let Some(key) = key_of(arg) else { continue };
        out.push('\n');
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        for line in wrap(&help, 94) {
            out.push_str(&format!("# {line}\n"));
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if defaults.is_empty() || (is_repeatable(arg) && defaults.iter().all(|d| d.is_empty())) {
            out.push_str(&format!("# {key} =   (unset by default)\n"));
        } else {
            out.push_str(&format!("{key} = {}\n", toml_value(arg, &defaults)));
        }
    }
    out.push_str(
        "\n# Per model (repeatable): a --model NAME=SOURCE?options written out.\n\
         # [models.NAME]\n# source = \"hf-hub:timm/tf_efficientnetv2_s.in1k\"\n\
         # dtype = \"f32\"  # backend, max_batch_size, max_batch_delay_ms, instances, jpeg_draft, input_size, arch\n",
    );
    out
}

/// A value typed as TOML: booleans for switches, numbers where the text is one, arrays for
/// repeatable flags, strings otherwise.
fn toml_value(arg: &Arg, values: &[String]) -> String {
    let one = |text: &str| -> Value {
        if is_flag(arg) {
            Value::Boolean(text == "true")
        } else if let Ok(number) = text.parse::<i64>() {
            Value::Integer(number)
        } else {
            Value::String(text.to_owned())
        }
    };
    let value = if is_repeatable(arg) {
        Value::Array(values.iter().map(|v| one(v)).collect())
    } else {
        one(&values[0])
    };
    value.to_string()
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for paragraph in text.lines() {
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &[&str]) -> Vec<OsString> {
        line.iter().map(OsString::from).collect()
    }

    #[test]
    fn finds_the_file_on_the_command_line_before_parsing() {
        let path = |line: &[&str]| requested_path(&args(line));
        assert_eq!(path(&["vs", "--config", "a.toml"]), Some("a.toml".into()));
        assert_eq!(
            path(&["vs", "serve", "--config=b.toml", "--port", "1"]),
            Some("b.toml".into())
        );
        // After `--` it is an argument, not the flag.
        assert_eq!(
            path(&["vs", "classify", "--", "--config", "c"]).filter(|p| p == Path::new("c")),
            None
        );
    }

    #[test]
    fn suggests_only_close_keys() {
        let known = ["max_batch_size", "max_batch_delay_ms", "port"];
        assert_eq!(
            suggestion("max_batch_sise", known.into_iter()),
            " (did you mean `max_batch_size`?)"
        );
        assert_eq!(
            suggestion("prot", known.into_iter()),
            " (did you mean `port`?)"
        );
        assert_eq!(suggestion("completely_else", known.into_iter()), "");
    }

    #[test]
    fn values_are_typed_back_as_toml() {
        let flag = Arg::new("on").long("on").action(ArgAction::SetTrue);
        let repeated = Arg::new("m").long("model").action(ArgAction::Append);
        let single = Arg::new("p").long("port").action(ArgAction::Set);
        assert_eq!(toml_value(&flag, &["true".into()]), "true");
        assert_eq!(
            toml_value(&repeated, &["a=b".into(), "c".into()]),
            r#"["a=b", "c"]"#
        );
        assert_eq!(toml_value(&single, &["8080".into()]), "8080");
        assert_eq!(toml_value(&single, &["30s".into()]), r#""30s""#);
        assert!(as_arguments(&single, &Value::Array(vec![])).is_err());
        assert!(as_arguments(&flag, &Value::Integer(1)).is_err());
        assert_eq!(
            as_arguments(&repeated, &Value::String("x".into())).unwrap(),
            ["x"]
        );
    }
}
