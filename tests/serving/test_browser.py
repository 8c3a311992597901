"""The admin dashboard in a real headless Chromium (Playwright): every server is shown,
killing one from the page restarts it while requests keep completing. Screenshot goes to
test-artifacts/admin-dashboard.png."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.serving.conftest import ADMIN_TOKEN, engine_config, serving_client

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=(
        "BROWSER TEST SKIPPED: /usr/bin/chromium is missing; install it with "
        "`apt-get update && apt-get install -y chromium` to test the admin dashboard")),
]


async def test_dashboard_kill_a_server_and_watch_it_restart(tiny_dir):
    from playwright.async_api import async_playwright

    # expert servers in their own OS processes: a kill really kills a process (new pid)
    cfg = engine_config(tiny_dir, placement={"num_expert_servers": 3, "server_mode": "process"})
    async with serving_client(cfg) as client:
        topo = await (await client.get("/admin/api/topology")).json()
        names = [s["name"] for s in topo["servers"]]
        assert len(names) == 3
        old_pid = topo["servers"][0]["pid"]
        assert isinstance(old_pid, int)
        stop = asyncio.Event()
        statuses: list[int] = []

        async def traffic() -> None:
            req = {"prompt": [4, 5, 6], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
            while not stop.is_set():
                statuses.append((await client.post("/v1/completions", json=req)).status)

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1440, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # /health answering 503 while a server restarts is expected, and the page shows it
            page.on("console", lambda m: errors.append(f"{m.text} ({m.location.get('url')})")
                    if m.type == "error" and not m.location.get("url", "").endswith("/health")
                    else None)
            await page.goto(str(client.make_url("/admin")))
            for name in names:  # every server is on the page
                await page.wait_for_selector(f'#servers tr[data-server="{name}"]', timeout=10_000)
            await page.wait_for_selector('#tree [data-actor="shard-0"]')
            await page.fill("#token", ADMIN_TOKEN)
            await page.dispatch_event("#token", "change")
            load = asyncio.ensure_future(traffic())
            await page.wait_for_function("document.querySelector('.kpi') !== null")
            victim = names[0]
            kill = page.locator(f'#servers tr[data-server="{victim}"] button[data-action="kill"]')
            await kill.click()  # arms the two-step confirm
            await page.wait_for_selector(f'tr[data-server="{victim}"] button.confirm')
            await kill.click()
            await page.wait_for_selector(f"#toasts .toast:has-text('kill {victim}: ok')")
            # the row shows the restart, and the server is up again
            await page.wait_for_function(
                """([name, old]) => {
                    const row = document.querySelector(`#servers tr[data-server="${name}"]`);
                    if (!row) return false;
                    const restarts = Number(row.querySelector('[data-field=restarts]').textContent);
                    const pid = row.querySelector('[data-field=pid]').textContent;
                    return restarts >= 1 && pid !== old
                        && row.querySelector('[data-field=state]').dataset.up === '1';
                }""", arg=[victim, str(old_pid)], timeout=30_000)
            await page.wait_for_selector('#log .ev[data-event="admin.kill_server"]')
            await page.wait_for_selector('#log .ev[data-event="actor_restarted"]')
            served_during = len(statuses)
            stop.set()
            await load
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "admin-dashboard.png"), full_page=True)
            await browser.close()
    assert served_during > 0 and statuses and all(s == 200 for s in statuses), statuses
    assert not errors, errors
