#!/usr/bin/env python3
"""A TCP proxy that limits each connection's downstream bytes to RATE MiB/s.

    throttle_proxy.py LISTEN_PORT UPSTREAM_HOST:PORT RATE_MIB

It stands for a link where one connection cannot fill the pipe (a CDN or
object store that throttles per connection, a long round trip), which is
where fetching a layer as parallel range requests pays. Loopback only.
"""
import asyncio
import sys
import time


async def pump(reader, writer, rate):
    start, sent = time.monotonic(), 0
    try:
        while True:
            data = await reader.read(64 * 1024)
            if not data:
                break
            writer.write(data)
            await writer.drain()
            if rate:
                sent += len(data)
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main():
    port, upstream, rate_mib = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    host, up_port = upstream.rsplit(":", 1)
    assert host.startswith("127."), "loopback only"
    rate = rate_mib * 1024 * 1024

    async def handle(client_r, client_w):
        up_r, up_w = await asyncio.open_connection(host, int(up_port))
        await asyncio.gather(pump(client_r, up_w, 0), pump(up_r, client_w, rate))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
