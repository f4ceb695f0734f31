"""The shared HTTP/1.1 codec (`lmfleet/wire/codec.py`), without sockets: bytes in, parts out."""

from __future__ import annotations

import pytest

from lmfleet.wire.codec import (
    MAX_HEAD,
    Http1Error,
    ResponseParser,
    encode_request_head,
    parse_response_head,
)

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n"
    b"6;name=value;flag\r\n world\r\n"  # chunk extensions are ignored
    b"A ; x\r\n, and more\r\n"  # upper-case hex, whitespace around the ";"
    b"0\r\nX-Trailer: 1\r\nX-Other: two\r\n\r\n"  # trailers are read and dropped
)
CHUNKED_BODY = b"hello world, and more"


def feed_all(parser: ResponseParser, pieces: list[bytes]) -> bytes:
    return b"".join(part for piece in pieces for part in parser.feed(piece))


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_request_head_is_written_as_given() -> None:
    head = encode_request_head(
        b"POST", b"/v1/x?a=1", [(b"Host", b"node:1"), (b"Content-Length", b"2")]
    )
    assert head == b"POST /v1/x?a=1 HTTP/1.1\r\nHost: node:1\r\nContent-Length: 2\r\n\r\n"


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/", [(b"X-Evil", b"a\r\nInjected: yes")]),
        (b"/", [(b"X-Evil", b"bare\nlf")]),
        (b"/", [(b"X-Evil", b"bare\rcr")]),
        (b"/ HTTP/1.1\r\nHost: other\r\n\r\nGET /", []),
    ],
)
def test_request_head_refuses_line_breaks(
    target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    with pytest.raises(Http1Error, match="line break"):
        encode_request_head(b"GET", target, headers)


def test_content_length_body_in_one_read_and_keep_alive() -> None:
    parser = ResponseParser()
    body = parser.feed(b"HTTP/1.1 201 Created\r\nServer: x\r\nContent-Length: 5\r\n\r\nhello")
    assert body == [b"hello"] and parser.done and parser.keep_alive
    head = parser.head
    assert head is not None
    assert (head.status, head.reason, head.http_version) == (201, b"Created", b"1.1")
    assert head.headers == [
        (b"Server", b"server", b"x"),
        (b"Content-Length", b"content-length", b"5"),
    ]
    assert (head.framing, head.content_length) == ("length", 5)


def test_content_length_body_byte_by_byte() -> None:
    raw = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world"
    parser = ResponseParser()
    assert feed_all(parser, split_every(raw, 1)) == b"hello world"
    assert parser.done and parser.keep_alive


def test_chunked_body_with_extensions_and_trailers() -> None:
    parser = ResponseParser()
    assert feed_all(parser, [CHUNKED]) == CHUNKED_BODY
    assert parser.done and parser.keep_alive
    assert parser.head is not None and parser.head.framing == "chunked"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 64])
def test_chunked_body_split_across_reads_anywhere(size: int) -> None:
    """Every split point: inside the head, a size line, chunk data, a CRLF, a trailer."""
    parser = ResponseParser()
    assert feed_all(parser, split_every(CHUNKED, size)) == CHUNKED_BODY
    assert parser.done and parser.keep_alive


def test_a_large_chunk_comes_out_in_pieces_as_it_arrives() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n01234") == [
        b"01234"
    ]
    assert parser.feed(b"56789") == [b"56789"]
    assert parser.feed(b"abcdef\r\n0\r\n\r\n") == [b"abcdef"]
    assert parser.done


def test_each_chunk_of_a_burst_is_its_own_piece() -> None:
    """SSE: one event per chunk; a burst read together still yields event by event."""
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert parser.feed(b"3\r\nab\n\r\n3\r\ncd\n\r\n") == [b"ab\n", b"cd\n"]
    assert not parser.done


def test_connection_close_and_http10() -> None:
    closing = ResponseParser()
    closing.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert closing.done and not closing.keep_alive

    old = ResponseParser()
    old.feed(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert old.done and not old.keep_alive
    assert old.head is not None and old.head.http_version == b"1.0"

    old_kept = ResponseParser()
    old_kept.feed(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok")
    assert old_kept.keep_alive

    listed = ResponseParser()
    listed.feed(b"HTTP/1.1 200 OK\r\nConnection: upgrade, Close\r\nContent-Length: 0\r\n\r\n")
    assert not listed.keep_alive


def test_read_until_close() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ") == [b"until "]
    assert parser.feed(b"the end") == [b"the end"]
    assert not parser.done
    parser.feed_eof()
    assert parser.done and not parser.keep_alive


def test_transfer_encoding_wins_over_content_length() -> None:
    head = parse_response_head(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert head.framing == "chunked" and head.content_length == -1
    gzip_last = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n")
    assert gzip_last.framing == "close" and not gzip_last.keep_alive


@pytest.mark.parametrize(
    ("raw", "head_request"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", False),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", True),
    ],
)
def test_responses_without_a_body(raw: bytes, head_request: bool) -> None:
    parser = ResponseParser(head_request=head_request)
    assert parser.feed(raw) == []
    assert parser.done and parser.keep_alive


def test_interim_responses_are_skipped() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n") == []
    assert parser.head is None
    body = parser.feed(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert body == [] and parser.head is None
    assert parser.feed(b"Content-Length: 2\r\n\r\nok") == [b"ok"]
    assert parser.head is not None and parser.head.status == 200


def test_bytes_after_a_complete_response_mean_no_reuse() -> None:
    sized = ResponseParser()
    assert sized.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA") == [b"ok"]
    assert sized.done and not sized.keep_alive

    chunked = ResponseParser()
    chunked.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1")
    assert chunked.done and not chunked.keep_alive

    late = ResponseParser()
    late.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert late.keep_alive
    late.feed(b"junk")
    assert not late.keep_alive


def test_headers_keep_case_and_lose_surrounding_whitespace() -> None:
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nX-Name:  spaced value \t\r\nEmpty:\r\n\r\n")
    assert head.headers == [(b"X-Name", b"x-name", b"spaced value"), (b"Empty", b"empty", b"")]
    assert parse_response_head(b"HTTP/1.1 200\r\n\r\n").reason == b""


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1 status line"),
        (b"HTTP/2 200 OK\r\n\r\n", "not an HTTP/1 status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1 status line"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "not an HTTP/1 status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\n: x\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nA: 1\r\n folded\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nA: 1\nB: 2\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nA: 1\rB: 2\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", "bad or conflicting content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad or conflicting content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n", "bad or conflicting content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting"),
    ],
)
def test_malformed_heads_raise_a_clear_error(raw: bytes, message: str) -> None:
    with pytest.raises(Http1Error, match=message):
        ResponseParser().feed(raw)


def test_repeated_equal_content_length_is_accepted() -> None:
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n")
    assert head.content_length == 2


@pytest.mark.parametrize(
    "size_line",
    [b"zz", b"0x5", b"-5", b"+5", b"5_0", b"", b" 5", b"1 2", b"1234567890abcdef0"],
)
def test_bad_chunk_sizes_raise(size_line: bytes) -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(Http1Error, match="bad chunk size"):
        parser.feed(size_line + b"\r\nhello\r\n")


def test_chunk_data_must_end_in_crlf() -> None:
    for pieces in ([b"3\r\nabcXY"], [b"3\r\nab", b"c", b"XY"]):
        parser = ResponseParser()
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        with pytest.raises(Http1Error, match="not followed by CRLF"):
            feed_all(parser, pieces)


def test_oversize_head_is_refused_before_it_ends() -> None:
    parser = ResponseParser(max_head=1024)
    parser.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(Http1Error, match="larger than 1024"):
        for _ in range(100):
            parser.feed(b"X-Filler: " + b"x" * 50 + b"\r\n")


def test_default_head_limit_and_a_head_just_under_it() -> None:
    filler = b"X-Filler: " + b"x" * (MAX_HEAD - 100) + b"\r\n"
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\n" + filler + b"Content-Length: 0\r\n\r\n")
    assert parser.done
    with pytest.raises(Http1Error, match="larger than"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\n" + filler + filler)


def test_endless_chunk_size_line_and_trailers_are_refused() -> None:
    parser = ResponseParser(max_head=1024)
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(Http1Error, match="longer than 1024"):
        parser.feed(b"5;" + b"e" * 2000)

    parser = ResponseParser(max_head=1024)
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    with pytest.raises(Http1Error, match="trailers larger than 1024"):
        for _ in range(100):
            parser.feed(b"X-T: " + b"t" * 50 + b"\r\n")


@pytest.mark.parametrize(
    ("fed", "message"),
    [
        (b"", "before any response byte"),
        (b"HTTP/1.1 200 OK\r\n", "before the response head"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "before the end of the body"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "end of the body"),
    ],
)
def test_eof_before_the_end_is_an_error(fed: bytes, message: str) -> None:
    parser = ResponseParser()
    parser.feed(fed)
    assert parser.started is bool(fed)
    with pytest.raises(Http1Error, match=message):
        parser.feed_eof()


def test_eof_after_a_complete_response_is_fine() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    parser.feed_eof()
    assert parser.done


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ],
)
def test_bytes_after_a_response_are_kept_for_the_next(first: bytes) -> None:
    """Pipelined answers arrive in one read: the rest belongs to the next response, and
    a connection with unread bytes must not be reused as if it were clean."""
    second = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext"
    parser = ResponseParser()
    parser.feed(first + second[:10])
    parser.feed(second[10:])
    assert parser.done and not parser.keep_alive
    assert parser.rest == second
    following = ResponseParser()
    assert following.feed(parser.rest) == [b"next"] and following.keep_alive
