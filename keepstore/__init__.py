"""keepstore-py: a Keep block server (Arvados keepstore protocol) on asyncio and aiohttp."""

__version__ = "0.1.0"
