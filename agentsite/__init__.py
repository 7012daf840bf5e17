from agentsite.asyncio_compat import wait_for_fix_install

# Before anything (redis-py, Channels) awaits `asyncio.wait_for`: every process imports
# this package first, for its settings.
wait_for_fix_install()
