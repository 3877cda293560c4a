"""A small MCP client for sbx-net's MCP tests: lists the tools, calls
each tool named on the command line, and prints one JSON object:

    {"tools": [...names...], "calls": {"search": {"ok": true, "text": ...} |
                                         {"ok": false, "code": -32001, "message": ..., "data": ...}}}

    client.py URL [--sse] TOOL...

HTTPS servers are trusted through SSL_CERT_FILE (the sandbox CA).
"""

import argparse
import asyncio
import json
import os
import ssl

import httpx2
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


# The test server's tools' arguments (any other tool is called with none):
# values a test can look for where arguments must never be (records, logs).
ARGUMENTS = {"search": {"query": "arg-q-5e1"}, "fetch": {"url": "arg-u-5e1"}, "delete_repo": {"name": "arg-n-5e1"}}


def http_client(**kwargs) -> httpx2.AsyncClient:
    verify = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"]) if "SSL_CERT_FILE" in os.environ else True
    return httpx2.AsyncClient(verify=verify, timeout=httpx2.Timeout(20.0, read=30.0), **kwargs)


async def session_calls(session: ClientSession, tools: list[str]) -> dict:
    await session.initialize()
    listed = await session.list_tools()
    calls = {}
    for tool in tools:
        try:
            result = await session.call_tool(tool, ARGUMENTS.get(tool, {}))
            text = " ".join(getattr(c, "text", "") for c in result.content)
            calls[tool] = {"ok": not result.is_error, "text": text}
        except MCPError as e:
            err = e.error
            calls[tool] = {"ok": False, "code": err.code, "message": err.message, "data": err.data}
    return {"tools": sorted(t.name for t in listed.tools), "calls": calls}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--sse", action="store_true")
    parser.add_argument("tools", nargs="*")
    args = parser.parse_args()
    if args.sse:
        async with sse_client(args.url, httpx_client_factory=lambda headers=None, timeout=None, auth=None: http_client(headers=headers, auth=auth)) as (read, write):
            async with ClientSession(read, write) as session:
                out = await session_calls(session, args.tools)
    else:
        async with http_client() as client:
            async with streamable_http_client(args.url, http_client=client) as (read, write):
                async with ClientSession(read, write) as session:
                    out = await session_calls(session, args.tools)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    # A refusal the client never hears of would otherwise hang the test.
    asyncio.run(asyncio.wait_for(main(), timeout=120))
