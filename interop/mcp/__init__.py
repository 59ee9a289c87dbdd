"""MCP over streamable HTTP at /mcp (`mcp`): every published chain a tool."""
