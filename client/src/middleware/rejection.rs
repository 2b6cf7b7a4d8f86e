//! The one place that turns a refused call into a response, for either
//! transport.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{BoxError, MiddlewareError, Transport};
use crate::ErrorCode;

/// Renders an error for the caller's transport: a gRPC trailers-only response
/// (`grpc-status`, `grpc-message`) or an HTTP status with the JSON body
/// `{"error": {"code": "permission_denied", "message": "..."}}`. The status
/// and code come from [`ErrorCode`], so both transports agree.
pub fn error_response(transport: Transport, code: ErrorCode, message: &str) -> Response<Full<Bytes>> {
    match transport {
        Transport::Grpc => tonic::Status::new(code.grpc(), message).into_http::<Full<Bytes>>(),
        Transport::Http => http_error_response(code, message, None),
    }
}

/// The HTTP/JSON error response: the status for `code` and the body
/// `{"error": {"code": ..., "message": ..., "details": ...}}`, where
/// `details` (left out when `None`) carries what a gRPC status carries in
/// its details, such as the backpressure signal of RESOURCE_EXHAUSTED.
pub fn http_error_response(
    code: ErrorCode,
    message: &str,
    details: Option<serde_json::Value>,
) -> Response<Full<Bytes>> {
    let mut error = serde_json::json!({ "code": code.as_str(), "message": message });
    if let Some(details) = details {
        error["details"] = details;
    }
    let body = serde_json::json!({ "error": error });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = code.http_status();
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if code == ErrorCode::Unauthenticated {
        response
            .headers_mut()
            .insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"omnirelay\""));
    }
    response
}

/// Classifies an error from further in: our refusals, a `tonic::Status`, and
/// the refusals of tower's own limit layers keep their meaning; anything else
/// is INTERNAL with a generic message (the details go to the log only).
fn classify(err: &BoxError) -> (ErrorCode, String) {
    if let Some(err) = err.downcast_ref::<MiddlewareError>() {
        return (err.code(), err.to_string());
    }
    if let Some(status) = err.downcast_ref::<tonic::Status>() {
        return (ErrorCode::from_grpc(status.code()), status.message().to_string());
    }
    if err.is::<tower::timeout::error::Elapsed>() {
        return (ErrorCode::DeadlineExceeded, "deadline exceeded".into());
    }
    if err.is::<tower::load_shed::error::Overloaded>() {
        return (ErrorCode::ResourceExhausted, "the node is overloaded; retry later".into());
    }
    tracing::error!(error = %err, "failed to serve a call: unexpected middleware error");
    (ErrorCode::Internal, "internal error".into())
}

/// Layer of [`ErrorResponse`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorResponseLayer;

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ErrorResponse { inner }
    }
}

/// Turns every error of the layers inside into a response for the caller's
/// transport (see [`error_response`]); its own error type is `Infallible`, as
/// tonic and axum expect of a service.
///
/// `poll_ready` is the inner service's readiness; an inner readiness error is
/// logged and surfaces on the next call as INTERNAL rather than tearing the
/// connection down.
#[derive(Debug, Clone)]
pub struct ErrorResponse<S> {
    inner: S,
}

impl<S, B, ResB> Service<Request<B>> for ErrorResponse<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<Either<ResB, Full<Bytes>>>;
    type Error = Infallible;
    type Future = ErrorResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A failed readiness is reported through the call instead; see call().
        match ready!(self.inner.poll_ready(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(err) => {
                let err: BoxError = err.into();
                tracing::error!(error = %err, "failed to get the inner service ready");
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let transport = Transport::of(request.headers());
        ErrorResponseFuture { inner: self.inner.call(request), transport }
    }
}

pin_project! {
    /// Future of [`ErrorResponse`].
    pub struct ErrorResponseFuture<F> {
        #[pin]
        inner: F,
        transport: Transport,
    }
}

impl<F, ResB, E> Future for ErrorResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Either<ResB, Full<Bytes>>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response.map(Either::Left),
            Err(err) => {
                let (code, message) = classify(&err.into());
                let span = tracing::Span::current();
                span.record("error.code", code.as_str());
                span.record("otel.status_code", "ERROR");
                error_response(*this.transport, code, &message).map(Either::Right)
            }
        };
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn body_text(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.expect("full body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn every_code_renders_the_same_on_both_transports() {
        for code in ErrorCode::ALL {
            let grpc = error_response(Transport::Grpc, code, "why it failed");
            assert_eq!(grpc.status(), http::StatusCode::OK, "gRPC errors are trailers-only 200s");
            let status = tonic::Status::from_header_map(grpc.headers()).expect("grpc-status header");
            assert_eq!(status.code(), code.grpc());
            assert_eq!(status.message(), "why it failed");

            let http = error_response(Transport::Http, code, "why it failed");
            assert_eq!(http.status(), code.http_status());
            let json: serde_json::Value = serde_json::from_str(&body_text(http).await).expect("json body");
            assert_eq!(json["error"]["code"], code.as_str());
            assert_eq!(json["error"]["message"], "why it failed");
        }
        let unauthenticated = error_response(Transport::Http, ErrorCode::Unauthenticated, "no");
        assert!(unauthenticated.headers().contains_key(http::header::WWW_AUTHENTICATE));
    }

    fn failing(err: BoxError) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = BoxError> + Clone {
        let err = std::sync::Arc::new(std::sync::Mutex::new(Some(err)));
        tower::service_fn(move |_req: Request<()>| {
            let err = err.lock().expect("test mutex").take().expect("one call");
            async move { Err::<Response<Full<Bytes>>, BoxError>(err) }
        })
    }

    async fn render(err: BoxError, transport: Transport) -> Response<Either<Full<Bytes>, Full<Bytes>>> {
        let mut request = Request::new(());
        if transport == Transport::Grpc {
            request.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        }
        ErrorResponseLayer.layer(failing(err)).oneshot(request).await.expect("infallible")
    }

    #[tokio::test]
    async fn refusals_statuses_and_tower_errors_keep_their_meaning() {
        let denied = MiddlewareError::PermissionDenied {
            principal: "p".into(),
            procedure: "enqueue",
            namespace: "resourcelease".into(),
        };
        let response = render(Box::new(denied), Transport::Http).await;
        assert_eq!(response.status(), http::StatusCode::FORBIDDEN);

        let response = render(Box::new(tonic::Status::aborted("stale token")), Transport::Grpc).await;
        let status = tonic::Status::from_header_map(response.headers()).expect("grpc-status");
        assert_eq!((status.code(), status.message()), (tonic::Code::Aborted, "stale token"));

        let response = render(Box::new(tower::load_shed::error::Overloaded::new()), Transport::Http).await;
        assert_eq!(response.status(), http::StatusCode::TOO_MANY_REQUESTS);

        let response = render("database password is hunter2".into(), Transport::Http).await;
        assert_eq!(response.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        assert!(!String::from_utf8_lossy(&bytes).contains("hunter2"), "internals never reach the caller");
    }
}
