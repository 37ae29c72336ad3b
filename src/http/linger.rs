//! Lingering close for request bodies (as nginx's `lingering_close`): a body that a handler
//! stops reading early (a refusal from the headers, a parse error, too many images, a body
//! over the limit) is read and thrown away in the background, within bounds, so that a client
//! still sending it gets to read the answer instead of a reset connection. hyper neither reads
//! nor closes an unread body on its own.
//!
//! Every request body is wrapped in [`LingeringBody`] by [`linger_on_drop`], the outermost
//! layer, so no error path can forget it.

use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// How much of an abandoned body is still read, and for how long.
const LINGER_BYTES: usize = 64 << 20;
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Wrap the request's body so that dropping it unfinished drains the rest.
pub async fn linger_on_drop(
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let request = request.map(|body| Body::new(LingeringBody::new(body)));
    next.run(request).await
}

/// A request body that, when dropped before its end, drains the rest in the background.
pub struct LingeringBody {
    inner: Option<Body>,
    finished: bool,
}

impl LingeringBody {
    fn new(inner: Body) -> Self {
        Self {
            inner: Some(inner),
            finished: false,
        }
    }
}

impl http_body::Body for LingeringBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.finished = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}

impl Drop for LingeringBody {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if self.finished || http_body::Body::is_end_stream(&body) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body));
        }
    }
}

/// Read and discard `body` within the lingering bounds.
async fn drain(mut body: Body) {
    use http_body_util::BodyExt;
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut read = 0;
    while read < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => read += frame.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
}
