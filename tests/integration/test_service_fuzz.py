"""Property-based fuzzing of the service's HTTP API from its own OpenAPI document (schemathesis).

`bentoml serve` on 127.0.0.1 with the tiny models; every operation of ``/docs.json`` gets cases
that fit the schema and cases that do not (wrong types, missing fields, odd bodies), on a
bounded budget (``FUZZ_EXAMPLES`` per operation and mode, ``FUZZ_SECONDS`` in all). Properties:
no answer is a 5xx, and every 4xx is a JSON object ``{"error": ...}``.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import requests

from .test_service import AUTH, tiny_service

pytestmark = pytest.mark.integration

FUZZ_EXAMPLES = int(os.environ.get("VISREC_FUZZ_EXAMPLES", "25"))
FUZZ_SECONDS = float(os.environ.get("VISREC_FUZZ_SECONDS", "45"))


@pytest.fixture(scope="module")
def fuzz_server(exported_models, tiny_cub, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with tiny_service(exported_models, tiny_cub, tmp, {"max_upload_mb": 1, "max_batch_latency_ms": 5000}) as url:
        yield url


def test_the_api_never_answers_5xx_and_every_4xx_is_a_json_error(fuzz_server):
    import hypothesis
    import hypothesis.errors
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from schemathesis.generation import GenerationMode

    url = fuzz_server
    schema = schemathesis.openapi.from_url(f"{url}/docs.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /recognize", "POST /embed", "POST /gallery/add", "GET /gallery/info"} <= labels, labels
    session = requests.Session()
    deadline = time.monotonic() + FUZZ_SECONDS
    seen: dict[int, int] = {}
    failures: list[str] = []

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > deadline:
                break

            @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                                 phases=[Phase.explicit, Phase.generate],
                                 suppress_health_check=list(HealthCheck))
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                if time.monotonic() > deadline:
                    return
                response = case.call(base_url=url, session=session, headers=dict(AUTH), timeout=60)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                status = response.status_code
                where = f"{case.method} {case.path} ({mode.value}) -> {status}: {response.text[:200]!r}"
                if status >= 500:
                    failures.append(where)
                elif status >= 400:
                    try:
                        body = response.json()
                    except json.JSONDecodeError:
                        body = None
                    if not (isinstance(body, dict) and isinstance(body.get("error"), str)):
                        failures.append(where)

            try:
                check()
            except hypothesis.errors.Unsatisfiable:  # e.g. no way to break an operation without inputs
                continue
    assert sum(seen.values()) >= 50, seen  # the budget bought a real run
    assert not failures, f"{len(failures)} bad answers (statuses {seen}):\n" + "\n".join(failures[:20])
    assert session.post(f"{url}/recognize", files={"image": ("x.png", b"junk")}, timeout=30).status_code == 400
