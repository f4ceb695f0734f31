"""`client.models.retrieve(name)` on both doors: LMDeploy's nodes have no
`GET /v1/models/{name}`, so the fleet answers it from the models its nodes serve."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio
import httpx2
import openai
import pytest
from support import SimNode, StartSim

from lmfleet import LMFleet
from lmfleet.proxy import ProxyServer

MODEL = "internlm/internlm2_5-7b-chat"  # a name with a slash, as most are
OTHER = "alpha"
FAST = ("--fast", "--health-poll-interval", "0")
OPENAI_FIELDS = {"id", "object", "created", "owned_by"}


@pytest.fixture
def nodes(start_sim: StartSim) -> list[SimNode]:
    """Two nodes serving different models: the fleet's list is the union."""
    return [start_sim(*FAST, "--model", MODEL), start_sim(*FAST, "--served-model-name", OTHER)]


@pytest.fixture
def fleet(nodes: list[SimNode]) -> Iterator[LMFleet]:
    with LMFleet.attach([n.url for n in nodes], health_interval=0.2) as fleet:
        fleet.wait_ready(timeout=30, min_ready=2)
        yield fleet


def node_card(node: SimNode) -> dict[str, object]:
    """The node's own entry in its `GET /v1/models` list."""
    listed = httpx2.get(node.url + "/v1/models", timeout=5).json()["data"]
    assert len(listed) == 1
    card: dict[str, object] = listed[0]
    return card


def check_retrieve(client: openai.OpenAI, nodes: list[SimNode]) -> None:
    for node, name in zip(nodes, (MODEL, OTHER), strict=True):
        model = client.models.retrieve(name)
        card = client.models.with_raw_response.retrieve(name).http_response.json()
        assert set(card) == OPENAI_FIELDS  # OpenAI's Model, nothing more
        assert model.id == name
        theirs = node_card(node)
        assert {k: card[k] for k in ("id", "object", "owned_by")} == {
            k: theirs[k] for k in ("id", "object", "owned_by")
        }
        assert isinstance(model.created, int) and model.created > 0
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    error = caught.value
    assert error.status_code == 404
    assert isinstance(error.body, dict) and error.body.get("param") == "model"
    assert "'no-such-model' does not exist" in error.message
    assert MODEL in error.message and OTHER in error.message  # what is served instead


def test_retrieve_through_the_fleets_clients(fleet: LMFleet, nodes: list[SimNode]) -> None:
    # A node asked directly has no such route: the answer can only be the fleet's.
    direct = httpx2.get(nodes[1].url + f"/v1/models/{OTHER}", timeout=5)
    assert direct.status_code in (404, 405)
    check_retrieve(fleet.client(max_retries=0), nodes)

    async def main() -> None:
        async with fleet.async_client(max_retries=0) as client:
            model = await client.models.retrieve(MODEL)
            assert (model.id, model.object, model.owned_by) == (MODEL, "model", "lmdeploy")
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("no-such-model")

    anyio.run(main)


def test_retrieve_through_the_proxy(
    serve_fleet: Callable[..., tuple[LMFleet, ProxyServer]], nodes: list[SimNode]
) -> None:
    _, server = serve_fleet([n.url for n in nodes], serve={"api_keys": ["sk-client"]})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-client", max_retries=0)
    check_retrieve(client, nodes)
    # As any /v1 route, it needs the client key; a model name never becomes a label.
    assert httpx2.get(server.url + f"/v1/models/{OTHER}", timeout=5).status_code == 401
    metrics = httpx2.get(server.url + "/metrics", timeout=5).text
    assert 'route="/v1/models/{model}"' in metrics and "no-such-model" not in metrics


def test_the_model_list_is_the_fleets_on_both_doors(fleet: LMFleet) -> None:
    """`client.models.list()` names every model a healthy node serves, not one node's."""
    server = fleet.serve(port=0)
    proxied = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    for client in (fleet.client(max_retries=0), proxied):
        listed = client.models.list().data
        assert sorted(m.id for m in listed) == sorted([MODEL, OTHER])
        assert all(m.object == "model" for m in listed)
