//! Turning a request body into images: raw image bytes, multipart/form-data or JSON+base64.
//!
//! Every path is bounded: the body by `--max-body-bytes` and `--body-timeout`, the number of
//! images by `--max-images-per-request` while parsing (a 32 MB JSON body of empty strings would
//! otherwise become ten million allocations before any check), and JSON parsing plus base64
//! decoding run on the decode pool, not on the async workers.

use super::error::ApiError;
use super::RequestLimits;
use crate::error::InferError;
use crate::images::decode::ACCEPTED_FORMATS;
use crate::images::DecodePool;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use base64::Engine;
use bytes::Bytes;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::future::Future;

pub const ACCEPTED_CONTENT_TYPES: &str =
    "image/jpeg, image/png, image/webp, image/gif, image/bmp, \
     application/octet-stream (raw image bytes), multipart/form-data (one or more image parts) \
     or application/json ({\"images\": [\"<base64>\", ...], \"top_k\": k})";

/// The images of one request, in order, and a `top_k` given in the body, if any.
pub struct RequestImages {
    pub images: Vec<Bytes>,
    pub top_k: Option<usize>,
}

pub async fn read_images(
    request: Request,
    limits: &RequestLimits,
    pool: &DecodePool,
) -> Result<RequestImages, ApiError> {
    let request = refuse_oversized(request, limits.max_body_bytes)?;
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_ascii_lowercase();
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    match media_type.as_str() {
        "multipart/form-data" => within_body_timeout(limits, read_multipart(request, limits)).await,
        "application/json" => {
            let body =
                within_body_timeout(limits, body_bytes(request, limits.max_body_bytes)).await?;
            let max_images = limits.max_images_per_request;
            pool.run(move || parse_json(&body, max_images))
                .await
                .map_err(InferError::from)?
        }
        // curl --data-binary sends form-urlencoded unless told otherwise; the bytes are sniffed
        // like any raw upload, so a wrong label on an image is no reason to refuse it.
        "application/octet-stream" | "application/x-www-form-urlencoded" | "" => {
            read_raw(request, limits).await
        }
        t if t.starts_with("image/") => read_raw(request, limits).await,
        other => {
            let err = ApiError::UnsupportedMediaType {
                message: format!(
                    "Content-Type {other:?} is not accepted; send {ACCEPTED_CONTENT_TYPES}"
                ),
            };
            discard_body(request);
            Err(err)
        }
    }
}

/// A client that trickles its body must not hold a handler (and delay shutdown) forever.
pub(super) async fn within_body_timeout<T>(
    limits: &RequestLimits,
    read: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout(limits.body_timeout, read)
        .await
        .map_err(|_| ApiError::BodyTimeout {
            seconds: limits.body_timeout.as_secs(),
        })?
}

/// Refuse a body whose declared `Content-Length` is over the limit from the headers alone, so
/// that a client announcing 2 GB is answered at once instead of being waited for.
pub(super) fn refuse_oversized(request: Request, limit: usize) -> Result<Request, ApiError> {
    match declared_length(&request) {
        Some(length) if length > limit as u64 => {
            discard_body(request);
            Err(ApiError::BodyTooLarge { limit })
        }
        _ => Ok(request),
    }
}

/// The body length the request declares, if it declares one.
fn declared_length(request: &Request) -> Option<u64> {
    request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The memory a body holds while its request runs, from its headers alone: its declared
/// `Content-Length` (the body limit when it declares none), twice that unless the body is the
/// raw image itself (JSON and multipart bodies are copied once while parsed). A declared length
/// over the limit is refused here, before the body is read.
pub(super) fn body_reservation(request: &Request, max_body_bytes: usize) -> Result<u64, ApiError> {
    let declared = declared_length(request);
    if declared.is_some_and(|length| length > max_body_bytes as u64) {
        return Err(ApiError::BodyTooLarge {
            limit: max_body_bytes,
        });
    }
    let media_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let raw = media_type.is_empty()
        || media_type.starts_with("image/")
        || media_type.starts_with("application/octet-stream");
    let copies = if raw { 1 } else { 2 };
    Ok(declared.unwrap_or(max_body_bytes as u64) * copies)
}

/// Drop a request refused before its body was read: [`super::linger::LingeringBody`] drains
/// what the client still sends, so that it reads the answer.
pub(crate) fn discard_body(request: Request) {
    drop(request);
}

pub(super) async fn body_bytes(request: Request, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|e| {
            if is_length_limit(&e) {
                ApiError::BodyTooLarge { limit }
            } else {
                ApiError::BadRequest(format!("could not read the request body: {e}"))
            }
        })
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

async fn read_raw(request: Request, limits: &RequestLimits) -> Result<RequestImages, ApiError> {
    let body = within_body_timeout(limits, body_bytes(request, limits.max_body_bytes)).await?;
    Ok(RequestImages {
        images: vec![body],
        top_k: None,
    })
}

/// Marks the serde error raised when the images array is longer than allowed.
const TOO_MANY_IMAGES: &str = "too many images";

/// Parse `{"images": [...], "top_k": k}`, decoding each image as it is read and stopping at the
/// first image beyond `max_images`.
fn parse_json(body: &[u8], max_images: usize) -> Result<RequestImages, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = JsonRequestSeed { max_images }
        .deserialize(&mut deserializer)
        .and_then(|request| deserializer.end().map(|()| request));
    parsed.map_err(|e| {
        let message = e.to_string();
        if message.starts_with(TOO_MANY_IMAGES) {
            ApiError::Infer(InferError::TooManyImages { limit: max_images })
        } else {
            ApiError::BadRequest(format!(
                "invalid JSON body ({message}); expected {{\"images\": [\"<base64>\", ...], \"top_k\": k}}"
            ))
        }
    })
}

struct JsonRequestSeed {
    max_images: usize,
}

impl<'de> DeserializeSeed<'de> for JsonRequestSeed {
    type Value = RequestImages;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for JsonRequestSeed {
    type Value = RequestImages;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with \"images\" and optionally \"top_k\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestImages, A::Error> {
        let (mut images, mut top_k) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "images" => {
                    images = Some(map.next_value_seed(ImagesSeed {
                        max_images: self.max_images,
                    })?)
                }
                "top_k" => top_k = Some(map.next_value::<usize>()?),
                other => return Err(A::Error::custom(format!("unknown field {other:?}"))),
            }
        }
        let images = images.ok_or_else(|| A::Error::missing_field("images"))?;
        Ok(RequestImages { images, top_k })
    }
}

struct ImagesSeed {
    max_images: usize,
}

impl<'de> DeserializeSeed<'de> for ImagesSeed {
    type Value = Vec<Bytes>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ImagesSeed {
    type Value = Vec<Bytes>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of base64-encoded images")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Bytes>, A::Error> {
        let mut images = Vec::new();
        while let Some(text) = seq.next_element::<String>()? {
            if images.len() == self.max_images {
                return Err(A::Error::custom(TOO_MANY_IMAGES));
            }
            let index = images.len();
            images.push(
                decode_base64(&text)
                    .map_err(|e| A::Error::custom(format!("images[{index}]: {e}")))?,
            );
        }
        Ok(images)
    }
}

/// Standard or URL-safe base64, with or without padding, optionally as a `data:` URL (shared
/// by `/v1`'s JSON images and v2's JSON `BYTES` elements).
pub(super) fn decode_base64(text: &str) -> Result<Bytes, String> {
    let payload = match text.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(',')
            .map(|(_, data)| data)
            .ok_or("malformed data: URL")?,
        None => text,
    };
    let payload: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let payload = payload.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(payload)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload))
        .map(Bytes::from)
        .map_err(|e| format!("not valid base64 ({e})"))
}

async fn read_multipart(
    request: Request,
    limits: &RequestLimits,
) -> Result<RequestImages, ApiError> {
    let limit = limits.max_body_bytes;
    let mut multipart = Multipart::from_request(request, &()).await.map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid multipart/form-data request: {}",
            e.body_text()
        ))
    })?;
    let mut images = Vec::new();
    let mut top_k = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        let name = field.name().unwrap_or("").to_owned();
        let is_file = field.file_name().is_some();
        let data = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
        if name == "top_k" && !is_file {
            let text = std::str::from_utf8(&data).unwrap_or("").trim().to_owned();
            top_k = Some(text.parse().map_err(|_| {
                ApiError::BadRequest(format!("top_k must be a positive integer, not {text:?}"))
            })?);
        } else {
            if images.len() == limits.max_images_per_request {
                return Err(ApiError::Infer(InferError::TooManyImages {
                    limit: limits.max_images_per_request,
                }));
            }
            images.push(data);
        }
    }
    if images.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "the multipart request has no image part; send one or more parts holding {ACCEPTED_FORMATS}"
        )));
    }
    Ok(RequestImages { images, top_k })
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge { limit }
    } else {
        ApiError::BadRequest(format!(
            "invalid multipart/form-data request: {}",
            e.body_text()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_variants_decode() {
        assert_eq!(decode_base64("aGk=").unwrap(), Bytes::from_static(b"hi"));
        assert_eq!(decode_base64("aGk").unwrap(), Bytes::from_static(b"hi"));
        assert_eq!(
            decode_base64("data:image/png;base64,aGk=").unwrap(),
            Bytes::from_static(b"hi")
        );
        assert!(decode_base64("***").is_err());
    }

    #[test]
    fn json_images_are_bounded_while_parsing() {
        let request = parse_json(br#"{"top_k": 3, "images": ["aGk=", "aGk"]}"#, 2).unwrap();
        assert_eq!(request.images.len(), 2);
        assert_eq!(request.top_k, Some(3));
        let many = format!("{{\"images\": [{}]}}", vec!["\"\""; 1000].join(","));
        assert!(matches!(
            parse_json(many.as_bytes(), 2),
            Err(ApiError::Infer(InferError::TooManyImages { limit: 2 }))
        ));
        for bad in [
            &br#"{"images": 3}"#[..],
            br#"{"top_k": 1}"#,
            br#"{"images": [], "x": 1}"#,
            b"[1]",
            br#"{"images": ["***"]}"#,
        ] {
            assert!(
                matches!(parse_json(bad, 2), Err(ApiError::BadRequest(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
