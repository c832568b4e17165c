//! The live stream's transport: one GET per connection, its status and
//! content type checked, then the body parsed by `eventsource-stream` behind
//! a byte-counting guard. The guard is why this is not reqwest-eventsource
//! (which parses with the same crate): that one buffers an endless line or a
//! huge event without limit and stalls for good after a byte that is not
//! UTF-8, with no hook to stop either. There is no built-in reconnect: the
//! caller opens a new connection with `since` from its cursor.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::stream::{self, BoxStream, Stream, StreamExt};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use reqwest::{Response, StatusCode};

/// The most bytes one stream event may take on the wire (its `data:` lines
/// and other fields; comment lines aside). A larger event is not buffered:
/// the connection is dropped and the run catches up by polling, whose
/// answers have their own, larger cap.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// What a stream yields.
#[derive(Debug)]
pub enum StreamEvent {
    /// The server answered 200 with an event stream.
    Open,
    Message(Event),
}

/// Why a stream could not open, or ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Boxed: a response is large, and errors travel by value.
    #[error("upstream answered {0}")]
    InvalidStatusCode(StatusCode, Box<Response>),
    #[error("not an event stream (content-type {0:?})")]
    InvalidContentType(HeaderValue, Box<Response>),
    #[error("{0}")]
    Transport(reqwest::Error),
    #[error("a stream event over the {} KiB cap", MAX_EVENT_BYTES / 1024)]
    Oversize,
    #[error("the stream carried bytes that are not UTF-8")]
    InvalidUtf8,
    #[error("the stream cannot be parsed: {0}")]
    Parser(String),
}

impl StreamError {
    /// The stream carried something it cannot deliver: reconnecting would
    /// meet it again, so the run catches up by polling first.
    pub fn is_undecodable(&self) -> bool {
        matches!(self, Self::Oversize | Self::InvalidUtf8 | Self::Parser(_))
    }
}

/// One connection's events: `Open`, then messages, until an error or the
/// end of the body.
pub struct EventSource {
    inner: Option<BoxStream<'static, Result<StreamEvent, StreamError>>>,
}

impl EventSource {
    /// Sends `request` when first polled.
    pub fn new(request: reqwest::RequestBuilder) -> Self {
        let connect = async move {
            let response = request
                .header(ACCEPT, HeaderValue::from_static("text/event-stream"))
                .send()
                .await
                .map_err(StreamError::Transport)?;
            check(response)
        };
        let inner = stream::once(connect)
            .flat_map(|checked| match checked {
                Ok(response) => {
                    let body = ByteGuard::new(response.bytes_stream().boxed(), MAX_EVENT_BYTES);
                    let messages = body.eventsource().map(|item| match item {
                        Ok(event) => Ok(StreamEvent::Message(event)),
                        Err(EventStreamError::Transport(error)) => Err(error),
                        Err(EventStreamError::Utf8(_)) => Err(StreamError::InvalidUtf8),
                        Err(EventStreamError::Parser(error)) => {
                            Err(StreamError::Parser(format!("{error:?}")))
                        }
                    });
                    stream::once(async { Ok(StreamEvent::Open) })
                        .chain(messages)
                        .left_stream()
                }
                Err(error) => stream::once(async { Err(error) }).right_stream(),
            })
            .boxed();
        Self { inner: Some(inner) }
    }

    /// Drops the connection; the stream ends.
    pub fn close(&mut self) {
        self.inner = None;
    }
}

impl Stream for EventSource {
    type Item = Result<StreamEvent, StreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.inner {
            Some(inner) => inner.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}

/// A 200 with `text/event-stream`, or the response handed back.
fn check(response: Response) -> Result<Response, StreamError> {
    if response.status() != StatusCode::OK {
        return Err(StreamError::InvalidStatusCode(
            response.status(),
            Box::new(response),
        ));
    }
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(""));
    let essence = content_type
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if essence.eq_ignore_ascii_case("text/event-stream") {
        Ok(response)
    } else {
        Err(StreamError::InvalidContentType(
            content_type,
            Box::new(response),
        ))
    }
}

/// Passes body chunks through unchanged, and ends the body with an error
/// once the event under way passes `cap` bytes or a byte is not UTF-8 (the
/// part of the chunk before that point goes out first, so the events it
/// completes are not lost): the parser behind it never buffers more than
/// `cap` bytes of an event.
struct ByteGuard<S> {
    inner: S,
    cap: usize,
    sizes: EventSize,
    utf8: Utf8Check,
    /// Sent at the next poll, after the good part of the chunk.
    fault: Option<StreamError>,
    done: bool,
}

impl<S> ByteGuard<S> {
    fn new(inner: S, cap: usize) -> Self {
        Self {
            inner,
            cap,
            sizes: EventSize::default(),
            utf8: Utf8Check::default(),
            fault: None,
            done: false,
        }
    }
}

impl<S> Stream for ByteGuard<S>
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Unpin,
{
    type Item = Result<Bytes, StreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(fault) = this.fault.take() {
            this.done = true;
            return Poll::Ready(Some(Err(fault)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let chunk = match this.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => chunk,
            Poll::Ready(Some(Err(error))) => {
                return Poll::Ready(Some(Err(StreamError::Transport(error))));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let over = this.sizes.feed(&chunk, this.cap);
        let invalid = this.utf8.feed(&chunk[..over.unwrap_or(chunk.len())]);
        let (good, fault) = match (invalid, over) {
            (Some(at), _) => (at, StreamError::InvalidUtf8),
            (None, Some(at)) => (at, StreamError::Oversize),
            (None, None) => return Poll::Ready(Some(Ok(chunk))),
        };
        if good == 0 {
            this.done = true;
            return Poll::Ready(Some(Err(fault)));
        }
        this.fault = Some(fault);
        Poll::Ready(Some(Ok(chunk.slice(..good))))
    }
}

/// The size of the event under way: bytes since the last blank line, line
/// terminators (LF, CR, CRLF) and comment lines (`:`) not counted; and of
/// the line under way, comments included (the parser buffers a line until
/// its end, whatever the line). Counting only; parsing stays with
/// `eventsource-stream`.
#[derive(Debug, Default)]
struct EventSize {
    line: usize,
    event: usize,
    comment: bool,
    after_cr: bool,
}

impl EventSize {
    /// Counts `chunk`; the index of the byte that takes the event under
    /// way over `cap`, if one does.
    fn feed(&mut self, chunk: &[u8], cap: usize) -> Option<usize> {
        for (index, &byte) in chunk.iter().enumerate() {
            match byte {
                b'\n' if self.after_cr => {}
                b'\r' | b'\n' if self.line == 0 => self.event = 0,
                b'\r' | b'\n' => (self.line, self.comment) = (0, false),
                b':' if self.line == 0 => (self.line, self.comment) = (1, true),
                _ if self.comment => self.line += 1,
                _ => (self.line, self.event) = (self.line + 1, self.event + 1),
            }
            self.after_cr = byte == b'\r';
            if self.event > cap || self.line > cap {
                return Some(index);
            }
        }
        None
    }
}

/// Whether the body so far is UTF-8, a character cut between two chunks
/// being completed by the next.
#[derive(Debug, Default)]
struct Utf8Check {
    /// The start of a character the last chunk ended in (at most 3 bytes).
    carry: Vec<u8>,
}

impl Utf8Check {
    /// Checks `chunk`; the index in it of the first byte that cannot be
    /// UTF-8 (or of the start of the character it breaks), if any.
    fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        let carried = self.carry.len();
        let joined;
        let bytes = if carried == 0 {
            chunk
        } else {
            joined = [self.carry.as_slice(), chunk].concat();
            joined.as_slice()
        };
        match std::str::from_utf8(bytes) {
            Ok(_) => {
                self.carry.clear();
                None
            }
            Err(error) if error.error_len().is_none() => {
                self.carry = bytes[error.valid_up_to()..].to_vec();
                None
            }
            Err(error) => Some(error.valid_up_to().saturating_sub(carried)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_size_counts_between_blank_lines() {
        let mut size = EventSize::default();
        for _ in 0..1000 {
            assert_eq!(size.feed(b"data: 0123456789\r\ndata: x\n\n", 40), None);
        }
        let comment = b": a comment, not in the event\n";
        assert_eq!(size.feed(b"data: 01234\n", 40), None);
        for _ in 0..3 {
            assert_eq!(size.feed(comment, 40), None, "comments are not counted");
        }
        assert_eq!(size.feed(b"\n", 40), None);
        assert_eq!(size.feed(b"data: 0123456789012345\r", 40), None);
        assert_eq!(size.feed(b"\ndata: 01234567890", 40), None);
        assert_eq!(size.feed(b"12", 40), Some(1), "one event over the cap");
    }

    #[test]
    fn an_endless_comment_line_is_over_the_cap() {
        let mut size = EventSize::default();
        assert_eq!(size.feed(b": ping\n", 40), None, "short comments pass");
        assert_eq!(size.feed(&[b':'; 30], 40), None);
        assert_eq!(size.feed(&[b' '; 30], 40), Some(10));
    }

    #[test]
    fn an_endless_line_is_over_the_cap() {
        let mut size = EventSize::default();
        let chunk = [b'x'; 1000];
        let fed = (0..100)
            .take_while(|_| size.feed(&chunk, 50_000).is_none())
            .count();
        assert_eq!(fed, 50);
    }

    #[test]
    fn utf8_across_chunks_passes_and_a_bad_byte_fails() {
        let text = "é☕🚀".as_bytes();
        let mut check = Utf8Check::default();
        for byte in text {
            assert_eq!(check.feed(std::slice::from_ref(byte)), None);
        }
        assert!(check.carry.is_empty());
        assert_eq!(Utf8Check::default().feed(b"data: \xff\n\n"), Some(6));
        let mut check = Utf8Check::default();
        assert_eq!(check.feed(b"ok \xe2\x98"), None);
        assert_eq!(check.feed(b"x"), Some(0), "a cut character not completed");
    }

    async fn guarded(chunks: Vec<&'static [u8]>, cap: usize) -> Vec<Result<Bytes, StreamError>> {
        let chunks = chunks.into_iter().map(|c| Ok(Bytes::from_static(c)));
        ByteGuard::new(stream::iter(chunks), cap).collect().await
    }

    #[tokio::test]
    async fn the_guard_passes_what_comes_before_the_fault_then_ends() {
        let out = guarded(
            vec![b"data: 1\n\n", b"data: 2\n\ndata: \xff\n\n", b"data: 3\n\n"],
            100,
        )
        .await;
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].as_ref().unwrap().as_ref(), b"data: 2\n\ndata: ");
        assert!(matches!(out[2], Err(StreamError::InvalidUtf8)));
        let out = guarded(vec![b"data: 1\n\ndata: 0123456789"], 8).await;
        assert_eq!(out[0].as_ref().unwrap().as_ref(), b"data: 1\n\ndata: 01");
        assert!(matches!(out[1], Err(StreamError::Oversize)));
        assert_eq!(out.len(), 2);
    }

    #[tokio::test]
    async fn events_before_an_oversize_one_in_the_same_chunk_are_parsed() {
        let body = stream::iter([Ok(Bytes::from_static(
            b"data: a\n\ndata: b\n\ndata: 0123456789",
        ))]);
        let events: Vec<_> = ByteGuard::new(body, 8).eventsource().collect().await;
        let data: Vec<&str> = events
            .iter()
            .filter_map(|e| e.as_ref().ok())
            .map(|e| e.data.as_str())
            .collect();
        assert_eq!(data, ["a", "b"]);
        assert!(matches!(
            events.last(),
            Some(Err(EventStreamError::Transport(StreamError::Oversize)))
        ));
    }
}
