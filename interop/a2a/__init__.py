"""A2A 1.0 (HTTP+JSON and JSON-RPC bindings, `a2a-sdk`): every published chain an agent."""
