"""A tiny ASGI application for hypercorn (PyPI), which accepts HTTP/2 over cleartext both with
prior knowledge and by `Upgrade: h2c` from HTTP/1.1: `GET /h2c/ok` answers 200, anything else
404. Run as `hypercorn asgi_h2c:app --bind 127.0.0.1:PORT` from this directory."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    ok = scope["path"] == "/h2c/ok"
    body = b"ok over h2c\n" if ok else b"missing\n"
    await send(
        {
            "type": "http.response.start",
            "status": 200 if ok else 404,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
