//! The one place that turns the proxy's own failures into responses. Each
//! carries `x-token-injector-error` naming its kind, so an app can tell a
//! proxy error from an upstream's answer, and a one-line body saying what
//! failed.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{Either, Full};

use super::Body;

pub const ERROR_HEADER: &str = "x-token-injector-error";

/// Whose fault an error was decides its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The client asked for a host without a route (or a CONNECT).
    NoRoute,
    /// The token endpoint has not given us a usable token.
    TokenUnavailable,
    /// The upstream could not be reached or broke the exchange.
    UpstreamUnreachable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The client's request cannot be proxied as sent.
    BadRequest,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NoRoute => "no_route",
            Kind::TokenUnavailable => "token_unavailable",
            Kind::UpstreamUnreachable => "upstream_unreachable",
            Kind::UpstreamTimeout => "upstream_timeout",
            Kind::BadRequest => "bad_request",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Kind::NoRoute => StatusCode::FORBIDDEN,
            Kind::TokenUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            Kind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Kind::BadRequest => StatusCode::BAD_REQUEST,
        }
    }
}

/// A failure of the proxy itself, with a message safe to show the app.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut line = format!("token-injector: {}: {}", self.kind.as_str(), self.message);
        // One line, whatever the message holds.
        line.retain(|c| c != '\r' && c != '\n');
        line.push('\n');
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(line))));
        *response.status_mut() = self.kind.status();
        let headers = response.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.kind.as_str()));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn responses_carry_kind_status_and_one_line() {
        for (kind, status) in [
            (Kind::NoRoute, 403),
            (Kind::TokenUnavailable, 503),
            (Kind::UpstreamUnreachable, 502),
            (Kind::UpstreamTimeout, 504),
            (Kind::BadRequest, 400),
        ] {
            let r = Error::new(kind, "what\r\nfailed").into_response();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()[ERROR_HEADER], kind.as_str());
            let body = r.into_body().collect().await.unwrap().to_bytes();
            let text = std::str::from_utf8(&body).unwrap();
            assert_eq!(
                text,
                format!("token-injector: {}: whatfailed\n", kind.as_str())
            );
        }
    }
}
