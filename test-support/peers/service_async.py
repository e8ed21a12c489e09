"""The service on an event loop: Python asyncio, an aiohttp server answering GET /api/<rid> by
calling the data service for /data/<rid> through one aiohttp ClientSession (a keep-alive pool):
one thread, many requests in flight.

Answers 200 when the data service did, 502 otherwise.
Usage: service_async.py ADDR PORT DATA_ADDR:PORT (with aiohttp: the repository's .venv)
"""
import sys

import aiohttp
from aiohttp import web

from datacall import data_id


DATA = sys.argv[3]


async def api(request):
    rid = request.match_info["rid"]
    async with request.app["session"].get(f"http://{DATA}/data/{data_id(rid)}") as resp:
        body = await resp.read()
        status = 200 if resp.status == 200 else 502
    return web.Response(status=status, body=body, content_type="text/plain")


async def session(app):
    app["session"] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    )
    yield
    await app["session"].close()


app = web.Application()
app.router.add_get("/api/{rid}", api)
app.cleanup_ctx.append(session)
web.run_app(
    app, host=sys.argv[1], port=int(sys.argv[2]), access_log=None, print=None, backlog=256
)
