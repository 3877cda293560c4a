"""A small MCP server for sbx-net's MCP tests (mcp SDK 2.x, `MCPServer`).

Tools `search`, `fetch` and `delete_repo`; every call is appended to the
log file given (one line `CALL <tool>`), so a test can tell that a call
the proxy refused never reached the server.

    server.py --transport streamable-http|sse --host ADDR --port N --log FILE
              [--certfile PEM --keyfile PEM]   (HTTPS)
"""

import argparse

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["streamable-http", "sse"], default="streamable-http")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log", required=True)
    # HTTPS (Streamable HTTP only): the certificate chain and key, PEM.
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    args = parser.parse_args()

    server = MCPServer("sbx-net-test")

    def called(tool: str) -> None:
        with open(args.log, "a", encoding="utf-8") as f:
            f.write(f"CALL {tool}\n")

    @server.tool()
    def search(query: str) -> str:
        """Searches the test corpus."""
        called("search")
        return f"results for {query}"

    @server.tool()
    def fetch(url: str) -> str:
        """Fetches a document."""
        called("fetch")
        return f"document at {url}"

    @server.tool()
    def delete_repo(name: str) -> str:
        """Deletes a repository (the tool a policy leaves out)."""
        called("delete_repo")
        return f"deleted {name}"

    # The test names the server by a DNS name the SDK's rebinding
    # protection does not know: the proxy, not the Host check, is tested.
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    if args.certfile:
        import uvicorn

        app = server.streamable_http_app(transport_security=security, host=args.host)
        config = uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile)
        uvicorn.Server(config).run()
    elif args.transport == "sse":
        server.run("sse", host=args.host, port=args.port, transport_security=security)
    else:
        server.run("streamable-http", host=args.host, port=args.port, transport_security=security)


if __name__ == "__main__":
    main()
