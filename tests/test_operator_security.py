"""The history stream and operator questions under the per-role users (docs/security.md): the
watchdog stores history and the CLI reads it; only the CLI's user asks the gateway, which
answers on the asker's inbox; a worker can neither ask nor write history."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.bus.connect import connect
from mesh.bus.telhistory import read_points
from mesh.host.config import load_settings
from mesh.host.telemetry import host_token, write_simulated
from tests.conftest import HANG_S, ROOT
from tests.fake_anthropic import FakeAnthropic, Reply
from tests.faults import until
from tests.test_security import WORKER, Secure, resources, secure  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


def start(s: Secure, user: str, role: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mesh", "agent", role],
            env={**s.env(user), **env},
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
        )


async def test_history_and_questions_under_each_roles_credentials(
    resources: Secure,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    n = resources.settings.names
    sim = tmp_path / "gpus.json"
    write_simulated(
        sim, [{"name": "S0", "temp_c": 66, "util_pct": 40, "mem_total_mb": 4096, "mem_used_mb": 512}]
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs = {"watchdog": tmp_path / "watchdog.log", "gateway": tmp_path / "gateway.log"}
    worker = await resources.client(WORKER)
    watchdog_conn = await resources.client("watchdog")
    with FakeAnthropic() as api:
        try:
            began = time.time()
            procs.append(
                start(
                    resources,
                    "watchdog",
                    "watchdog",
                    logs["watchdog"],
                    MESH_SIMULATED_GPUS=str(sim),
                    MESH_WATCHDOG_INTERVAL_S="0.2",
                    MESH_HISTORY_FINE_S="1",
                )
            )
            procs.append(
                start(
                    resources,
                    "gateway",
                    "gateway",
                    logs["gateway"],
                    MESH_GATEWAY_BASE_URL=api.base_url,
                    MESH_GATEWAY_API_KEY=api.key,
                )
            )
            cli_env = {**resources.env("cli"), "MESH_HISTORY_FINE_S": "1", "COLUMNS": "200"}
            cli = await connect(load_settings(environ=cli_env), "test-cli", wait_s=10)
            me = host_token()
            try:

                async def stored() -> bool:
                    _, points = await read_points(cli, since=began, host=me, res_s=1)
                    return len(points) >= 2

                await until(stored, HANG_S, "the watchdog's history, read with the CLI's user")
            finally:
                await cli.close()
            await until(
                lambda: "answering operator questions" in logs["gateway"].read_text(errors="replace"),
                HANG_S,
                "the gateway",
            )
            api.then(
                Reply(tool_calls=[("telemetry_history", {"since": "10m"})]),
                Reply(text="GPU 0 ran at 66 °C."),
            )
            done = subprocess.run(
                [sys.executable, "-m", "mesh", "ask", "how hot is GPU 0?"],
                env=cli_env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=HANG_S,
                stdin=subprocess.DEVNULL,
            )
            assert done.returncode == 0, done.stderr + logs["gateway"].read_text(errors="replace")
            assert "GPU 0 ran at 66 °C." in done.stdout and "telemetry_history" in done.stdout
            result = api.requests()[-1].body["messages"][-1]["content"][0]["content"]
            assert f"{me}.gpu0" in result and '"temp_c":{"min":66.0' in result
            # a worker may not ask (under its own name or the CLI's), nor listen for questions,
            # nor write history; the watchdog may not ask either
            for subject in (n.ask("cli"), n.ask(WORKER), n.hist_gpu(10, "x", 0)):
                await worker.refused_publish(subject)
            await worker.refused_subscribe(n.ask_all)
            await watchdog_conn.refused_publish(n.ask("cli"))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            await worker.close()
            await watchdog_conn.close()
