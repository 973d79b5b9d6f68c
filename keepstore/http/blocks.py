"""Block GET/HEAD/PUT and OPTIONS (SPEC §2.5, §2.6, §2.14).

Deliberate differences from the Go keepstore, both from difference 3 (corrupt data is never delivered as a
complete 200 body):

* A block is read whole into a pool buffer and verified *before* the first byte is sent. A copy that fails
  verification is quarantined and the next mount tried; if no good copy exists the answer is 502 with nothing
  sent. (Go streams first and cuts a 200 short when the last 64 KiB part fails: SPEC §11 item 37.)
* A size hint that disagrees with the stored size is a 502 for GET as for HEAD (Go sends a short 200, item 33).
"""

from __future__ import annotations

import asyncio
import re

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ..bodies import Body, WriterPipe, receive
from ..errors import (
    BadRequestBody,
    ClientGone,
    ContentHashMismatch,
    ContentLengthMismatch,
    InvalidLocator,
    KeepError,
    MethodNotAllowed,
    NoToken,
    TooLarge,
)
from ..locator import BLOCK_SIZE, EMPTY_BLOCK_HASH, parse_locator
from ..store import BlockData
from .app import OCTETS, Call, Reply, text_reply
from .auth import request_tokens

SEND_CHUNK = 1 << 20
SMALL_BODY = 64 * 1024
STREAM_MIN = 4 * 1024 * 1024  # PUT bodies from this size on are written to disk as they arrive


async def read(call: Call, match: re.Match[str]) -> Reply | None:
    svc = call.service
    request = call.request
    head = request.method == "HEAD"
    call.headers["Vary"] = "X-Keep-Signature"  # on errors too: proxies must not reuse a response across signatures
    loc = parse_locator(match["loc"])
    if not head and not loc.size and loc.hash != EMPTY_BLOCK_HASH:
        # Without a size hint a GET could not report a checksum mismatch after streaming; upstream refuses it too.
        raise MethodNotAllowed()
    tokens = request_tokens(request)
    if loc.remote and not loc.signed:
        # Federation (+R) reads need RemoteClusters, which this server does not support.
        if not tokens:
            raise NoToken()
        raise InvalidLocator("remote cluster not configured")
    if svc.config.blob_signing:
        if not tokens:
            raise NoToken()
        assert svc.signer is not None  # config validation guarantees a key when signing is on
        svc.signer.verify(loc.text, tokens[0])
    # Over TLS sendfile(2) cannot be used: asyncio would copy the file through a 256 KiB buffer, a thread hop and a
    # flow-control wait per piece (GET 1 MiB at 8 connections: 220 MB/s, against 1.4 GB/s in clear). The block is
    # read into the request's buffer while it is verified anyway: it is sent from there.
    transport = request.transport
    encrypted = transport is not None and transport.get_extra_info("sslcontext") is not None
    buf = svc.pool.try_acquire() or await svc.pool.acquire()  # (awaiting only when it must wait: a coroutine less)
    block: BlockData | None = None
    try:
        keep_max = 0 if head else BLOCK_SIZE if encrypted else SMALL_BODY
        block = await svc.store.read(loc.hash, loc.size, buf.view, keep_max=keep_max)
        size = block.size
        in_buffer = block.in_buffer  # (else: sent with sendfile, or asyncio's copy of the file over TLS)
        if in_buffer and not head and size <= SMALL_BODY:
            # One write for headers and body; the copy is cheaper than a second send.
            return Reply(200, bytes(buf.view[:size]), OCTETS)
        await call.start(size)
        if head:
            pass
        elif not in_buffer:
            assert block.file is not None
            await call.sendfile(block.file.fileno(), size)  # the very file that was verified
        else:
            for pos in range(0, size, SEND_CHUNK):
                chunk = buf.view[pos : min(size, pos + SEND_CHUNK)]
                # The default event loop's socket transport copies what it cannot send at once, so the buffer may
                # be reused as soon as the last write returns. A TLS transport may keep what it is given until it
                # can encrypt it (during a renegotiation, a shutdown): it gets a copy.
                await call.send(bytes(chunk) if encrypted else chunk)
        return None
    finally:
        if block is not None:
            block.close()
        svc.pool.release(buf)


async def write(call: Call, match: re.Match[str]) -> Reply:
    svc = call.service
    request = call.request
    declared = request.content_length
    if declared is not None and declared > BLOCK_SIZE:
        # Deliberate difference 1: refuse before reading the body. aiohttp then discards what the client still
        # sends for at most its lingering time (10 s) so that the client gets to read the 413, and closes.
        raise TooLarge()
    classes = [c.strip() for c in request.headers.get("X-Keep-Storage-Classes", "").split(",") if c.strip()]
    locator_path = match["loc"]
    exchange = call.exchange
    if svc.pool.would_wait():
        exchange.pace_body(False)
    async with svc.pool.buffer() as buf:
        exchange.pace_body(True)
        stream = None
        if declared is None or declared >= STREAM_MIN:
            # A large body goes to disk while it arrives (on the mount it is headed for, under the hash the URL
            # claims); it becomes visible only once it has been verified (see Store.open_stream).
            stream = await svc.store.open_stream(locator_path[:32], classes)
        committed = False
        try:
            if request.headers.get("Expect", "").lower() == "100-continue":
                # Only now that a buffer is ours do we ask for the body (as upstream does).
                await exchange.send_continue()
            pipe = WriterPipe(buf.view, stream[1]) if stream is not None else None
            body = await _receive(call, buf.view, pipe, declared)
            size, computed = body.size, body.md5
            if declared is not None and size != declared:
                raise ContentLengthMismatch(size, declared)
            if not locator_path.startswith(computed):
                raise ContentHashMismatch(computed, locator_path)
            done = []
            if stream is not None and pipe is not None and pipe.error is None:
                try:
                    await stream[1].commit(body.checkpoints)
                    committed = True
                    done = [stream[0]]
                except KeepError:
                    pass  # the normal write below tries this mount again, or the next one
            result = await svc.store.write(computed, buf.view[:size], classes, done=done, checkpoints=body.checkpoints)
        finally:
            exchange.pace_body(False)  # whatever comes next on this connection has no buffer yet
            if stream is not None and not committed:
                await stream[1].abort()
    tokens = request_tokens(request)
    locator = f"{computed}+{size}"
    if tokens and svc.signer is not None:
        locator = svc.signer.sign(locator, tokens[0])
    reply = text_reply(200, locator + "\n")
    reply.headers = {
        "X-Keep-Replicas-Stored": str(result.replicas),
        # Deliberate difference 7: classes sorted by name (upstream: Go map order).
        "X-Keep-Storage-Classes-Confirmed": ", ".join(f"{c}={n}" for c, n in sorted(result.classes.items())),
    }
    return reply


async def _receive(call: Call, view: memoryview, pipe: WriterPipe | None, declared: int | None) -> Body:
    """Read the request body into ``view`` while hashing it (and writing it, with a pipe)."""
    try:
        return await receive(call.request.content, view, writer=pipe, size_hint=declared)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        raise ClientGone(str(exc)) from exc
    except (RequestPayloadError, HttpProcessingError) as exc:
        call.exchange.close_after()
        raise BadRequestBody(f"invalid request body: {exc}") from exc


async def options(call: Call, match: re.Match[str]) -> Reply:
    return Reply(200)
