//! Deadline propagation: the caller's deadline bounds the call, and travels
//! on to the calls it makes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::future::{self, Either};
use http::{HeaderMap, HeaderValue, Request};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Timeout};
use tower::{Layer, Service};

use super::defaults::{DEFAULT_DEADLINE, MAX_DEADLINE};
use super::{BoxError, MiddlewareError, RpcRoute};

/// gRPC's deadline header: up to eight digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`), e.g. `grpc-timeout: 250m`.
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// The HTTP/JSON equivalent: the time left, in whole milliseconds.
pub const TIMEOUT_MS_HEADER: &str = "x-omnirelay-timeout-ms";

/// The deadline of the current call, in the request extensions. Handlers
/// bound long-polls with [`CallDeadline::remaining`]; outbound calls carry it
/// on with [`CallDeadline::write_headers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline {
    at: Instant,
    budget: Duration,
}

impl CallDeadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Self { at: Instant::now() + budget, budget }
    }

    /// The instant the call must be done by.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// The whole time the call was given.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// The time left (zero once past).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Writes the time left as both `grpc-timeout` (milliseconds) and
    /// `x-omnirelay-timeout-ms`, for an outbound call made on behalf of this
    /// one.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let millis = u64::try_from(self.remaining().as_millis()).unwrap_or(u64::MAX);
        // grpc-timeout allows at most eight digits: fall back to seconds.
        let grpc =
            if millis < 100_000_000 { format!("{millis}m") } else { format!("{}S", (millis / 1000).min(99_999_999)) };
        headers
            .insert(GRPC_TIMEOUT_HEADER, HeaderValue::from_str(&grpc).expect("digits and a unit are a valid header"));
        headers.insert(TIMEOUT_MS_HEADER, HeaderValue::from(millis));
    }
}

/// Parses a `grpc-timeout` value; `None` when malformed.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let digits = value.get(..value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match value.as_bytes()[value.len() - 1] {
        b'H' => Duration::from_secs(amount.checked_mul(3600)?),
        b'M' => Duration::from_secs(amount.checked_mul(60)?),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The timeout a request asks for: the smaller of `grpc-timeout` and
/// `x-omnirelay-timeout-ms` when both are present; an error naming the header
/// when one is malformed.
pub fn requested_timeout(headers: &HeaderMap) -> Result<Option<Duration>, MiddlewareError> {
    let grpc = match headers.get(GRPC_TIMEOUT_HEADER) {
        None => None,
        Some(value) => Some(value.to_str().ok().and_then(parse_grpc_timeout).ok_or_else(|| {
            MiddlewareError::invalid(GRPC_TIMEOUT_HEADER, "expected up to 8 digits and a unit (H, M, S, m, u, n)")
        })?),
    };
    let http = match headers.get(TIMEOUT_MS_HEADER) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= 12 && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    MiddlewareError::invalid(TIMEOUT_MS_HEADER, "expected whole milliseconds (up to 12 digits)")
                })?,
        ),
    };
    Ok(match (grpc, http) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// Deadlines applied when a call names none, and the longest allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineConfig {
    /// Used when the call names no deadline.
    pub default: Duration,
    /// Longer requests are clamped to this.
    pub max: Duration,
}

impl Default for DeadlineConfig {
    fn default() -> Self {
        Self { default: DEFAULT_DEADLINE, max: MAX_DEADLINE }
    }
}

/// Layer of [`DeadlinePropagation`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlinePropagationLayer {
    config: DeadlineConfig,
}

impl DeadlinePropagationLayer {
    /// Applies deadlines as `config` says.
    pub fn new(config: DeadlineConfig) -> Self {
        Self { config }
    }
}

impl<S> Layer<S> for DeadlinePropagationLayer {
    type Service = DeadlinePropagation<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlinePropagation { inner, config: self.config }
    }
}

/// Reads the caller's deadline (`grpc-timeout` or `x-omnirelay-timeout-ms`,
/// clamped to the maximum, the default when absent), inserts it as a
/// [`CallDeadline`], and fails the call with DEADLINE_EXCEEDED when the inner
/// service has not answered by then (dropping its future, which cancels the
/// work). A malformed header is INVALID_ARGUMENT and a zero deadline
/// DEADLINE_EXCEEDED, both before the inner service runs.
///
/// A session ([`Procedure::Session`](super::Procedure::Session), routed
/// before this layer) gets a [`CallDeadline`] only when the caller sent one:
/// it then bounds the whole stream, which the node enforces, while each
/// message carries its own deadline. Without one the stream has none.
///
/// `poll_ready` is the inner service's readiness; time spent waiting for it
/// is not charged to any call (tower's contract gives no request yet).
#[derive(Debug, Clone)]
pub struct DeadlinePropagation<S> {
    inner: S,
    config: DeadlineConfig,
}

impl<S, B> Service<Request<B>> for DeadlinePropagation<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Either<DeadlineFuture<S::Future>, future::Ready<Result<S::Response, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let requested = match requested_timeout(request.headers()) {
            Ok(requested) => requested.map(|d| d.min(self.config.max)),
            Err(err) => return Either::Right(future::ready(Err(Box::new(err) as BoxError))),
        };
        let session = request.extensions().get::<RpcRoute>().is_some_and(|route| route.procedure.is_session());
        let budget = match (requested, session) {
            (Some(budget), _) => budget,
            // A session lives as long as its caller keeps it: no default
            // deadline for the stream (each message gets one of its own).
            // Opening it is still bounded.
            (None, true) => {
                let open = CallDeadline::after(self.config.max);
                let inner = tokio::time::timeout_at(open.at, self.inner.call(request));
                return Either::Left(DeadlineFuture { inner, budget: self.config.max });
            }
            (None, false) => self.config.default,
        };
        if budget.is_zero() {
            return Either::Right(future::ready(Err(Box::new(MiddlewareError::deadline(budget)) as BoxError)));
        }
        let deadline = CallDeadline::after(budget);
        request.extensions_mut().insert(deadline);
        Either::Left(DeadlineFuture { inner: tokio::time::timeout_at(deadline.at, self.inner.call(request)), budget })
    }
}

pin_project! {
    /// Future of [`DeadlinePropagation`].
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: Timeout<F>,
        budget: Duration,
    }
}

impl<F, T, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match ready!(this.inner.poll(cx)) {
            Ok(result) => result.map_err(Into::into),
            Err(_elapsed) => Err(Box::new(MiddlewareError::deadline(*this.budget))),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::ServiceExt;

    use super::*;
    use crate::ErrorCode;

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("4S"), Some(Duration::from_secs(4)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "123456789m", "-1m", "1x", "1.5S", "１m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_travel_on_in_both_header_forms() {
        let deadline = CallDeadline::after(Duration::from_millis(1500));
        tokio::time::advance(Duration::from_millis(500)).await;
        let mut headers = HeaderMap::new();
        deadline.write_headers(&mut headers);
        assert_eq!(headers[GRPC_TIMEOUT_HEADER], "1000m");
        assert_eq!(headers[TIMEOUT_MS_HEADER], "1000");
        assert_eq!(requested_timeout(&headers).expect("valid"), Some(Duration::from_secs(1)));
    }

    /// Sleeps `delay` and reports the deadline it saw.
    fn slow(
        delay: Duration,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<Request<()>, Response = Option<CallDeadline>, Error = BoxError> + Clone {
        tower::service_fn(move |request: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, BoxError>(request.extensions().get::<CallDeadline>().copied())
            }
        })
    }

    fn request(headers: &[(&'static str, &'static str)]) -> Request<()> {
        let mut request = Request::new(());
        for (name, value) in headers {
            request.headers_mut().insert(*name, HeaderValue::from_static(value));
        }
        request
    }

    fn code(err: BoxError) -> ErrorCode {
        err.downcast::<MiddlewareError>().expect("a middleware error").code()
    }

    #[tokio::test(start_paused = true)]
    async fn calls_past_their_deadline_fail_with_deadline_exceeded() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = DeadlinePropagationLayer::default();
        for headers in [[(GRPC_TIMEOUT_HEADER, "100m")], [(TIMEOUT_MS_HEADER, "100")]] {
            let started = Instant::now();
            let err = layer
                .layer(slow(Duration::from_secs(10), calls.clone()))
                .oneshot(request(&headers))
                .await
                .expect_err("too slow");
            assert_eq!(code(err), ErrorCode::DeadlineExceeded);
            assert_eq!(started.elapsed(), Duration::from_millis(100));
        }
        let seen = layer
            .layer(slow(Duration::from_millis(10), calls.clone()))
            .oneshot(request(&[(GRPC_TIMEOUT_HEADER, "2S"), (TIMEOUT_MS_HEADER, "1500")]))
            .await
            .expect("fast enough")
            .expect("deadline extension");
        assert_eq!(seen.budget(), Duration::from_millis(1500), "the smaller of the two headers");
    }

    #[tokio::test(start_paused = true)]
    async fn absent_deadlines_get_the_default_and_long_ones_are_clamped() {
        let calls = Arc::new(AtomicUsize::new(0));
        let config = DeadlineConfig { default: Duration::from_secs(5), max: Duration::from_secs(60) };
        let layer = DeadlinePropagationLayer::new(config);
        let seen = layer
            .layer(slow(Duration::ZERO, calls.clone()))
            .oneshot(request(&[]))
            .await
            .expect("ok")
            .expect("deadline");
        assert_eq!(seen.budget(), Duration::from_secs(5));
        let seen = layer
            .layer(slow(Duration::ZERO, calls.clone()))
            .oneshot(request(&[(GRPC_TIMEOUT_HEADER, "2H")]))
            .await
            .expect("ok")
            .expect("deadline");
        assert_eq!(seen.budget(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_get_a_deadline_only_when_they_ask_for_one() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = DeadlinePropagationLayer::default();
        let session = |headers: &[(&'static str, &'static str)]| {
            let mut request = request(headers);
            let route =
                RpcRoute::from_path(super::super::Transport::Grpc, &super::super::Procedure::Session.grpc_path())
                    .expect("the session route");
            request.extensions_mut().insert(route);
            request
        };
        let seen = layer.layer(slow(Duration::ZERO, calls.clone())).oneshot(session(&[])).await.expect("opens");
        assert_eq!(seen, None, "no default deadline for a stream");
        let seen = layer
            .layer(slow(Duration::ZERO, calls.clone()))
            .oneshot(session(&[(GRPC_TIMEOUT_HEADER, "90S")]))
            .await
            .expect("opens")
            .expect("the stream's deadline");
        assert_eq!(seen.budget(), Duration::from_secs(90));
        let err = layer
            .layer(slow(Duration::ZERO, calls.clone()))
            .oneshot(session(&[(TIMEOUT_MS_HEADER, "0")]))
            .await
            .expect_err("spent");
        assert_eq!(code(err), ErrorCode::DeadlineExceeded);
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_or_zero_deadlines_never_reach_the_inner_service() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = DeadlinePropagationLayer::default();
        for (headers, expected, field) in [
            ([(GRPC_TIMEOUT_HEADER, "soon")], ErrorCode::InvalidArgument, Some(GRPC_TIMEOUT_HEADER)),
            ([(TIMEOUT_MS_HEADER, "-5")], ErrorCode::InvalidArgument, Some(TIMEOUT_MS_HEADER)),
            ([(GRPC_TIMEOUT_HEADER, "0m")], ErrorCode::DeadlineExceeded, None),
        ] {
            let err =
                layer.layer(slow(Duration::ZERO, calls.clone())).oneshot(request(&headers)).await.expect_err("refused");
            let err = err.downcast::<MiddlewareError>().expect("middleware error");
            assert_eq!(err.code(), expected);
            if let Some(field) = field {
                assert!(err.to_string().starts_with(field), "{err}");
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
