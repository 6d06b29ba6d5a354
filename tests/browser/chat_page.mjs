// Drive nanoslg's chat page in headless Chromium (Debian's /usr/bin/chromium via playwright-core).
// Usage: node chat_page.mjs <server-url> <screenshot.png>
// launch() gives Chromium a fresh temporary profile each run, removed on close.
// Prints a JSON summary on stdout and exits 0, or prints the reason on stderr and exits 1.
import { chromium } from "playwright-core";

const TIMEOUT_MS = 60_000;
const PROMPT = "What is the capital of France?";
const [url, screenshotPath] = process.argv.slice(2);
if (!url || !screenshotPath) {
  console.error("usage: node chat_page.mjs <server-url> <screenshot.png>");
  process.exit(2);
}

function fail(message) {
  throw new Error(message);
}

async function run(browser, log) {
  const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on("console", (m) => log.push(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => log.push(`pageerror: ${e.message}`));
  page.on("requestfailed", (r) => log.push(`requestfailed: ${r.url()} ${r.failure()?.errorText}`));

  const resp = await page.goto(url, { waitUntil: "load" });
  if (!resp || !resp.ok()) fail(`GET ${url} answered ${resp ? resp.status() : "nothing"}`);

  // The header shows the model id once GET /v1/models has answered.
  await page.waitForFunction(() => {
    const t = document.querySelector("#model-name")?.textContent.trim();
    return t && t !== "loading…";
  });
  const model = (await page.textContent("#model-name")).trim();
  if (model === "model unavailable") fail(`GET /v1/models failed: ${await page.getAttribute("#model-name", "title")}`);

  // Instrument the page before sending: every text the newest assistant bubble is given (one DOM
  // mutation per streamed chunk), the lengths actually on screen at successive animation frames, and
  // whether #stop was ever enabled.
  await page.evaluate(() => {
    Object.assign(window, { __lengths: [], __frameLengths: [], __stopEnabled: false });
    const push = (list, n) => { if (n > 0 && list[list.length - 1] !== n) list.push(n); };
    const box = document.querySelector("#messages");
    const stop = document.querySelector("#stop");
    new MutationObserver((records) => {
      for (const r of records) {
        const el = r.target.nodeType === Node.TEXT_NODE ? r.target.parentElement : r.target;
        if (r.target === stop) { window.__stopEnabled ||= !stop.disabled; continue; }
        if (!el || !el.classList.contains("assistant")) continue;
        if (r.type === "characterData") push(window.__lengths, el.textContent.length);
        for (const node of r.addedNodes) if (node.nodeType === Node.TEXT_NODE) push(window.__lengths, node.data.length);
      }
    }).observe(box, { childList: true, subtree: true, characterData: true });
    new MutationObserver(() => { window.__stopEnabled ||= !stop.disabled; })
      .observe(stop, { attributes: true, attributeFilter: ["disabled"] });
    const sample = () => {
      const bubble = [...box.querySelectorAll(".assistant")].pop();
      if (bubble) push(window.__frameLengths, bubble.textContent.length);
      if (!box.querySelector(".stats, .error")) requestAnimationFrame(sample);
    };
    requestAnimationFrame(sample);
  });

  await page.fill("#prompt", PROMPT);
  await page.click("#send");

  // Done when the tokens/s line appears; an error bubble means the request failed.
  const outcome = await Promise.race([
    page.waitForSelector(".stats").then(() => "stats"),
    page.waitForSelector(".error").then(() => "error"),
  ]);
  if (outcome === "error") fail(`the page showed an error: ${(await page.textContent(".error")).trim()}`);

  const summary = await page.evaluate(() => ({
    userText: document.querySelector(".user")?.textContent ?? "",
    finalText: [...document.querySelectorAll(".assistant")].pop()?.textContent ?? "",
    lengthsSeen: window.__lengths,
    frameLengthsSeen: window.__frameLengths,
    stopEnabledWhileStreaming: window.__stopEnabled,
    stats: document.querySelector(".stats")?.textContent ?? "",
    sendEnabledAfter: !document.querySelector("#send").disabled,
    stopDisabledAfter: document.querySelector("#stop").disabled,
  }));
  await page.screenshot({ path: screenshotPath, fullPage: true });
  Object.assign(summary, { model, screenshot: screenshotPath });

  if (summary.userText !== PROMPT) fail(`user bubble shows ${JSON.stringify(summary.userText)}`);
  if (!summary.finalText.trim()) fail("the assistant reply is empty");
  const distinct = new Set(summary.lengthsSeen.filter((n) => n > 0));
  if (distinct.size < 2) fail(`the reply did not stream: lengths seen ${JSON.stringify(summary.lengthsSeen)}`);
  if (!/tok\/s/.test(summary.stats)) fail(`stats line lacks tok/s: ${JSON.stringify(summary.stats)}`);
  if (!summary.stopEnabledWhileStreaming) fail("#stop was never enabled while the reply streamed");
  if (!summary.sendEnabledAfter || !summary.stopDisabledAfter) fail("Send/Stop buttons not reset after the reply");
  return summary;
}

const log = [];
let browser;
let code = 0;
const watchdog = setTimeout(() => {
  console.error(`timed out after ${2 * TIMEOUT_MS / 1000} s\n${log.join("\n")}`);
  process.exit(1);
}, 2 * TIMEOUT_MS);
try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
    headless: true,
    timeout: TIMEOUT_MS,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const summary = await run(browser, log);
  console.log(JSON.stringify(summary, null, 2));
} catch (e) {
  console.error(`chat page check failed: ${e.message}`);
  if (log.length) console.error(`browser log:\n${log.join("\n")}`);
  code = 1;
} finally {
  clearTimeout(watchdog);
  if (browser) await browser.close().catch(() => {});
}
process.exit(code);
