"""Every published chain as an A2A agent and as an MCP tool (docs/interop.md).

Thin adapters over the official packages (`a2a-sdk`, `mcp`; the `interop` extra): their servers
handle the wire, ours the calls, through the same steps as the REST API (`interop.calls`). Mounted
at the ASGI layer (`interop.asgi`), beside the fast lane.
"""
