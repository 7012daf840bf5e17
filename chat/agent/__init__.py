"""The LangGraph engine, laid out like LangGraph's react-agent template."""
