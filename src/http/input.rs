//! Turning a request body into images: raw image bytes, multipart/form-data or JSON+base64.

use crate::error::ApiError;
use crate::pipeline::decode::ACCEPTED_FORMATS;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;

pub const ACCEPTED_CONTENT_TYPES: &str =
    "image/jpeg, image/png, image/webp, image/gif, image/bmp, \
     application/octet-stream (raw image bytes), multipart/form-data (one or more image parts) \
     or application/json ({\"images\": [\"<base64>\", ...], \"top_k\": k})";

/// The images of one request, in order, and a `top_k` given in the body, if any.
pub struct RequestImages {
    pub images: Vec<Bytes>,
    pub top_k: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    images: Vec<String>,
    #[serde(default)]
    top_k: Option<usize>,
}

pub async fn read_images(
    request: Request,
    max_body_bytes: usize,
) -> Result<RequestImages, ApiError> {
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
        "multipart/form-data" => read_multipart(request, max_body_bytes).await,
        "application/json" => read_json(request, max_body_bytes).await,
        // curl --data-binary sends form-urlencoded unless told otherwise; the bytes are sniffed
        // like any raw upload, so a wrong label on an image is no reason to refuse it.
        "application/octet-stream" | "application/x-www-form-urlencoded" | "" => {
            read_raw(request, max_body_bytes).await
        }
        t if t.starts_with("image/") => read_raw(request, max_body_bytes).await,
        other => Err(ApiError::UnsupportedMediaType {
            message: format!(
                "Content-Type {other:?} is not accepted; send {ACCEPTED_CONTENT_TYPES}"
            ),
        }),
    }
}

async fn body_bytes(request: Request, limit: usize) -> Result<Bytes, ApiError> {
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

async fn read_raw(request: Request, limit: usize) -> Result<RequestImages, ApiError> {
    let body = body_bytes(request, limit).await?;
    Ok(RequestImages {
        images: vec![body],
        top_k: None,
    })
}

async fn read_json(request: Request, limit: usize) -> Result<RequestImages, ApiError> {
    let body = body_bytes(request, limit).await?;
    let parsed: JsonRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid JSON body ({e}); expected {{\"images\": [\"<base64>\", ...], \"top_k\": k}}"
        ))
    })?;
    let images = parsed
        .images
        .iter()
        .enumerate()
        .map(|(i, text)| {
            decode_base64(text).map_err(|e| ApiError::BadRequest(format!("images[{i}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RequestImages {
        images,
        top_k: parsed.top_k,
    })
}

/// Standard base64, with or without padding, optionally as a `data:` URL.
fn decode_base64(text: &str) -> Result<Bytes, String> {
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
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim_end_matches('='))
        .or_else(|_| {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(payload.trim_end_matches('='))
        })
        .or_else(|_| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))
        })
        .map(Bytes::from)
        .map_err(|e| format!("not valid base64 ({e})"))
}

async fn read_multipart(request: Request, limit: usize) -> Result<RequestImages, ApiError> {
    let mut multipart = Multipart::from_request(request, &()).await.map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid multipart/form-data request: {}",
            e.body_text()
        ))
    })?;
    let mut images = Vec::new();
    let mut top_k = None;
    loop {
        let field = multipart
            .next_field()
            .await
            .map_err(|e| multipart_error(e, limit))?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or("").to_owned();
        let is_file = field.file_name().is_some();
        let data = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
        if name == "top_k" && !is_file {
            let text = std::str::from_utf8(&data).unwrap_or("").trim().to_owned();
            top_k = Some(text.parse().map_err(|_| {
                ApiError::BadRequest(format!("top_k must be a positive integer, not {text:?}"))
            })?);
        } else {
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
}
