"""A running request's session: followers from any index, coalescing, the ending."""

from __future__ import annotations

import asyncio

from orchestrator.session import Delta, Ending, RequestSession


async def _drain(session: RequestSession, from_index: int) -> list:
    return [item async for item in session.follow(from_index)]


def test_a_reader_behind_gets_the_piled_up_deltas_as_one_chunk_from_its_index():
    async def body():
        session = RequestSession("r", prompt_tokens=3)
        await session.push([1, 2], "ab")
        await session.push([3], "c")
        await session.push([], "!")  # text only: held-back text released at the end
        await session.push([4, 5], "de")
        await session.end("length")
        whole, resumed = await _drain(session, 0), await _drain(session, 3)
        assert whole == [Delta(0, (1, 2, 3, 4, 5), "abc!de"), Ending("length")]
        # Text released after token 3 arrived (held back before) belongs to a reader resuming there.
        assert resumed == [Delta(3, (4, 5), "!de"), Ending("length")]
        mid = await _drain(session, 1)  # starts inside the first delta: the ids from 1, its text dropped
        assert mid[0].index == 1 and mid[0].token_ids == (2, 3, 4, 5) and mid[0].text == "c!de"
        assert session.followers == 0

    asyncio.run(body())


def test_a_follower_waits_for_tokens_and_sees_them_in_order():
    async def body():
        session = RequestSession("r", prompt_tokens=1)
        reader = asyncio.create_task(_drain(session, 0))
        await asyncio.sleep(0)
        assert session.followers == 1
        for t in range(4):
            await session.push([t], str(t))
            await asyncio.sleep(0)
        await session.end("stop")
        items = await reader
        tokens = [t for item in items if isinstance(item, Delta) for t in item.token_ids]
        assert tokens == [0, 1, 2, 3] and items[-1] == Ending("stop")
        assert [d.index for d in items[:-1]] == sorted(d.index for d in items[:-1])

    asyncio.run(body())


def test_tokens_pushed_with_the_ending_while_the_reader_is_away_are_not_lost():
    async def scenario() -> list:
        session = RequestSession("r", prompt_tokens=3)
        await session.push([1, 2], "ab")
        stream = session.follow()
        got = [await stream.__anext__()]  # the reader holds the first chunk...
        await session.push([3], "c")  # ...while the last token and the ending arrive
        await session.end("length")
        got += [item async for item in stream]
        return got

    got = asyncio.run(scenario())
    assert [t for item in got if isinstance(item, Delta) for t in item.token_ids] == [1, 2, 3]
    assert isinstance(got[-1], Ending) and got[-1].finish_reason == "length"
