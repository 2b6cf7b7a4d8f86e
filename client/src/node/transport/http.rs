//! The HTTP/JSON transport: `POST /resourcelease/v1/{namespace}/{procedure}`
//! with the request message's JSON form ([`json`](crate::node::json)) as
//! its body, answered through [`call`](super::call) with the response's
//! JSON form, or the error body of [`NodeError::http_response`].

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::HeaderValue;
use omnirelay_proto::resourcelease::v1 as pb;

use super::call;
use super::grpc::LeaseService;
use crate::ids::ShardId;
use crate::middleware::{Procedure, RpcRoute, Transport};
use crate::node::error::{NodeError, Result};
use crate::node::forward::Forwardable;
use crate::node::json::{self, JsonMessage};
use crate::node::procedures::{CallContext, procedures};
use crate::node::state::NodeInner;
use crate::shard::parse_namespace;

/// Decodes a request body as `R`, fills in or checks its namespace against
/// the path's, runs it and encodes the response.
async fn answer_json<R>(node: &NodeInner, cx: &CallContext, namespace: &ShardId, body: &[u8]) -> Result<Vec<u8>>
where
    R: Forwardable + JsonMessage,
    R::Response: JsonMessage,
{
    let mut request: R = json::decode(body)?;
    check_namespace(request.namespace_mut(), namespace)?;
    let response = call(node, cx, request).await?;
    Ok(json::encode(&response))
}

/// Writes `dispatch_json`: the request type of each procedure of the list.
macro_rules! json_dispatch {
    ($($variant:ident => $method:ident($request:ident) -> $response:ident),* $(,)?) => {
        /// Decodes a JSON request for `procedure`, runs it and encodes the
        /// JSON response.
        async fn dispatch_json(
            node: &NodeInner,
            cx: &CallContext,
            procedure: Procedure,
            namespace: &ShardId,
            body: &[u8],
        ) -> Result<Vec<u8>> {
            match procedure {
                Procedure::Session => Err(NodeError::NotACall(procedure)),
                $(Procedure::$variant => answer_json::<pb::$request>(node, cx, namespace, body).await,)*
            }
        }
    };
}

procedures!(json_dispatch);

/// The body of an HTTP/JSON call may leave `namespace` out (the path names
/// it) or repeat the path's; naming another one is refused, since the
/// authorization decision was taken on the path.
fn check_namespace(body: &mut String, path: &ShardId) -> Result<()> {
    if body.is_empty() {
        *body = path.to_string();
        return Ok(());
    }
    let named = parse_namespace("namespace", body).map_err(|err| {
        NodeError::invalid("namespace", err.to_string().trim_start_matches("namespace: ").to_string())
    })?;
    if &named != path {
        return Err(NodeError::invalid("namespace", format!("the body names {named} but the path addresses {path}")));
    }
    Ok(())
}

/// The HTTP/JSON handler of `POST /resourcelease/v1/{namespace}/{procedure}`:
/// the route and caller come from the middleware, the body is the request
/// message's JSON form, and the answer the response's (200) or the error
/// body of [`NodeError::http_response`].
pub(crate) async fn http_call(State(service): State<LeaseService>, request: Request) -> Response {
    match serve_json(&service.node, request).await {
        Ok(body) => {
            let mut response = Response::new(Body::from(body));
            response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(err) => err.http_response().into_response(),
    }
}

async fn serve_json(node: &NodeInner, request: Request) -> Result<Vec<u8>> {
    let (parts, body) = request.into_parts();
    let cx = CallContext::from_extensions(&parts.extensions, node)?
        .forwarded_in(parts.headers.contains_key(crate::node::forward::FORWARDED_BY_HEADER));
    let route = match parts.extensions.get::<RpcRoute>() {
        Some(route) => route.clone(),
        None => RpcRoute::from_path(Transport::Http, parts.uri.path())
            .map_err(|err| NodeError::invalid("path", err.to_string()))?,
    };
    let namespace = route.namespace.clone().unwrap_or_else(|| ShardId::new(crate::shard::DEFAULT_NAMESPACE));
    if let Some(content_type) = parts.headers.get(http::header::CONTENT_TYPE) {
        let json = content_type
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(NodeError::invalid("content-type", "must be application/json"));
        }
    }
    // The middleware already buffered the body within the procedure's limit;
    // the bound here only matters when the router runs without it.
    let limit = crate::middleware::RequestLimits::default().limit_for(route.procedure);
    let body: Bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|err| NodeError::invalid("request body", format!("could not be read: {err}")))?;
    dispatch_json(node, &cx, route.procedure, &namespace, &body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_may_repeat_or_omit_the_path_namespace_but_not_contradict_it() {
        let path = ShardId::from("resourcelease.users");
        let mut empty = String::new();
        check_namespace(&mut empty, &path).expect("omitted");
        assert_eq!(empty, "resourcelease.users");
        check_namespace(&mut "resourcelease.users".to_string(), &path).expect("same");
        let err = check_namespace(&mut "resourcelease.billing".to_string(), &path).expect_err("different");
        assert_eq!(err.code(), crate::ErrorCode::InvalidArgument);
        assert!(err.to_string().starts_with("invalid namespace: "), "{err}");
    }
}
