// The operator's chat (`mesh ask` in the console): a question is an operator's action (it spends
// the gateway's budget), POSTed to /api/ask; the answer streams back as server-sent events, one
// step each: text as it is generated, each tool the operator used and what it looked at, then
// done (with the conversation a follow-up continues) or failed. Everything shown is text.
(function () {
  "use strict";
  let conversation = "";

  async function ask(question, say) {
    const response = await fetch("/api/ask", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Mesh-Action": "1" },
      body: JSON.stringify({ question, conversation }),
    });
    if (!response.ok) throw new Error(`${response.status}: ${(await response.text()).slice(0, 300)}`);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!block.startsWith("data: ")) continue;
        const step = JSON.parse(block.slice(6));
        if (step.step === "text") say(step.text);
        else if (step.step === "tool") say(`\n[${step.error ? "tried" : "looked at"}: ${step.looked_at || step.name}]\n`);
        else if (step.step === "done") {
          conversation = step.conversation || "";
          if (step.looked_at && step.looked_at.length) say(`\n\n(from: ${step.looked_at.join("; ")})`);
        } else if (step.step === "failed") say(`\n(${step.reason}: ${step.error})`);
      }
    }
  }

  // The panel folds to its title (a click on it), folded at first on a narrow screen; on a wide one
  // the page leaves it room, so it covers none of a table.
  function foldable() {
    const panel = document.getElementById("chat");
    const title = panel.querySelector("h2");
    title.setAttribute("role", "button");
    title.setAttribute("tabindex", "0");
    const flip = () => {
      panel.classList.toggle("folded");
      title.setAttribute("aria-expanded", String(!panel.classList.contains("folded")));
    };
    title.addEventListener("click", flip);
    title.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); flip(); } });
    if (window.matchMedia("(max-width: 1100px)").matches) panel.classList.add("folded");
    title.setAttribute("aria-expanded", String(!panel.classList.contains("folded")));
    document.body.classList.add("with-chat");
  }

  fetch("/api/me", { credentials: "same-origin" })
    .then((r) => r.json())
    .then((me) => {
      if (me.role !== "operator" || !window.meshChat) return;
      window.meshChat.attach(ask);
      foldable();
    })
    .catch(() => {});
})();
