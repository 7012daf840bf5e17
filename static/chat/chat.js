// The chat pane: sends frames over the WebSocket and draws run events as they stream.
// Text from the agent or the user is only ever inserted with textContent; the only HTML
// inserted is what the server rendered and sanitized (the `html` fields).
(function () {
  "use strict";

  const chat = document.getElementById("chat");
  if (!chat) return;
  const conversationId = chat.dataset.conversation;
  const list = document.getElementById("messages");
  const form = document.getElementById("composer");
  const input = document.getElementById("input");
  const sendButton = document.getElementById("send");
  const stopButton = document.getElementById("stop");
  const notice = document.getElementById("notice");
  const budgetLine = document.getElementById("budget");

  const lastSeq = {};          // run id -> highest seq drawn
  const turns = {};            // run id -> {el, segment, segments, steps}
  let activeRun = chat.dataset.activeRun || null;
  let socket = null;
  let retryDelay = 500;
  let pendingUser = null;      // the bubble drawn before the server confirmed the message
  let ready = false;           // the current socket has said hello ("session")
  const outbox = [];           // a message sent before that, delivered once it has

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Follow the stream only while the reader is at the bottom: someone who scrolled up to
  // read an earlier answer is not yanked away by every token.
  function nearBottom() {
    return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  }

  function scrollDown() {
    list.scrollTop = list.scrollHeight;
  }

  function showNotice(text) {
    notice.textContent = text;
    notice.hidden = false;
  }

  function hideNotice() {
    notice.hidden = true;
  }

  function setBusy(busy) {
    stopButton.hidden = !busy;
    stopButton.disabled = false;
    sendButton.disabled = busy;
  }

  function removeEmptyHint() {
    const empty = document.getElementById("empty");
    if (empty) empty.remove();
  }

  function turnFor(runId) {
    if (!turns[runId]) {
      const wrapper = el("div", "turn");
      wrapper.dataset.run = runId;
      // Shown until the first token or step: a real model can take seconds to start.
      const thinking = el("div", "thinking", "Thinking");
      wrapper.appendChild(thinking);
      list.appendChild(wrapper);
      turns[runId] = { el: wrapper, thinking: thinking, segment: null, segments: [], steps: {} };
    }
    return turns[runId];
  }

  function stopThinking(turn) {
    if (turn.thinking) {
      turn.thinking.remove();
      turn.thinking = null;
    }
  }

  function currentSegment(turn) {
    if (!turn.segment) {
      stopThinking(turn);
      const bubble = el("div", "bubble assistant streaming");
      bubble.setAttribute("aria-busy", "true"); // screen readers wait for the whole answer
      const content = el("div", "content");
      bubble.appendChild(content);
      turn.el.appendChild(bubble);
      turn.segment = content;
      turn.segments.push(content);
    }
    return turn.segment;
  }

  // The text streamed since the run's last step: the step a resumed run does again.
  function dropCutText(turn) {
    if (!turn.segment) return;
    turn.segment.parentElement.remove();
    turn.segments.pop();
    turn.segment = null;
  }

  // The first message names a new conversation; show the name without a reload.
  function showTitle(title) {
    if (!title) return;
    const heading = chat.querySelector(".chat-header .title");
    if (heading) heading.textContent = title;
    const current = document.querySelector(".conversations li.current a");
    if (current) current.textContent = title;
    document.title = title + " · Agentsite";
  }

  function drawUserMessage(message) {
    if (!message) return;
    if (document.querySelector('[data-message="' + message.id + '"]')) return;
    let bubble = pendingUser;
    pendingUser = null;
    if (!bubble) {
      bubble = el("div", "bubble user");
      bubble.appendChild(el("div", "content"));
      list.appendChild(bubble);
    }
    bubble.dataset.message = message.id;
    bubble.classList.remove("pending");
    bubble.querySelector(".content").innerHTML = message.html; // sanitized by the server
  }

  function drawToolStarted(turn, event) {
    stopThinking(turn);
    const step = el("details", "step running");
    step.dataset.toolCall = event.tool_call_id;
    const summary = el("summary");
    summary.appendChild(el("span", "step-icon", "⚙"));
    summary.appendChild(document.createTextNode(" "));
    summary.appendChild(el("span", "step-name", event.name));
    step.appendChild(summary);
    const body = el("div", "step-body");
    body.appendChild(el("div", "step-label", "Arguments"));
    // A string: the arguments of a call that never ran, as the model sent them.
    const args = typeof event.args === "string" ? event.args : JSON.stringify(event.args, null, 2);
    body.appendChild(el("pre", "step-args", args));
    body.appendChild(el("div", "step-label", "Result"));
    const result = el("pre", "step-result", "running…");
    body.appendChild(result);
    step.appendChild(body);
    turn.el.appendChild(step);
    turn.steps[event.tool_call_id] = step;
    turn.segment = null; // text after a tool call starts a new bubble
  }

  function drawToolFinished(turn, event) {
    const step = turn.steps[event.tool_call_id];
    if (!step) return;
    step.classList.remove("running");
    if (event.is_error) step.classList.add("error");
    step.querySelector(".step-result").textContent = event.result;
    // The result at a glance while the step is folded.
    const summary = step.querySelector("summary");
    summary.appendChild(document.createTextNode(" "));
    summary.appendChild(el("span", "step-preview", "→ " + event.result));
  }

  const STATUS_LABELS = {
    cancelled: "Stopped",
    failed: "Failed",
    limit_reached: "Limit reached",
    budget_exceeded: "Budget reached",
    interrupted: "Interrupted",
  };

  function drawRunEnd(turn, event) {
    stopThinking(turn);
    // Swap the streamed plain text for the server's sanitized Markdown rendering. The
    // server stores each text segment exactly as streamed but drops blank ones, so blank
    // bubbles go and the others take the answers in order.
    const answers = (event.messages || []).slice();
    turn.segments.forEach(function (segment) {
      const bubble = segment.parentElement;
      bubble.classList.remove("streaming");
      bubble.removeAttribute("aria-busy");
      if (!segment.textContent.trim()) {
        bubble.remove();
        return;
      }
      const answer = answers.shift();
      if (answer) {
        segment.innerHTML = answer.html; // sanitized by the server
        bubble.dataset.message = answer.id;
      }
    });
    // A step the run never finished (stopped or failed mid-call) must not spin forever.
    Object.keys(turn.steps).forEach(function (id) {
      const step = turn.steps[id];
      if (step.classList.contains("running")) {
        step.classList.remove("running");
        step.classList.add("unfinished");
        step.querySelector(".step-result").textContent = "did not finish";
      }
    });
    turn.el.appendChild(drawFooter(event));
  }

  // As tracing/formatting.py's format_usd, so the live footer and the reloaded page
  // read the same. The amount arrives as a decimal string; null means unpriced.
  function drawFooter(event) {
    const footer = el("div", "run-footer " + event.status);
    footer.dataset.run = event.run;
    // Stopping is the user's own doing, not an error worth a red line.
    if (event.error && event.status !== "cancelled") {
      footer.appendChild(el("div", "run-error", event.error.message));
    }
    if (STATUS_LABELS[event.status]) {
      footer.appendChild(el("span", "run-status", STATUS_LABELS[event.status]));
      footer.appendChild(document.createTextNode(" · "));
    }
    footer.appendChild(el("span", "cost", event.cost_display || "price unknown"));
    footer.appendChild(document.createTextNode(" · "));
    const usage = event.usage || {};
    footer.appendChild(el("span", "usage",
      (usage.total_tokens || 0) + " tokens · " + (usage.input_tokens || 0) + " in / " +
      (usage.output_tokens || 0) + " out"));
    if (chat.dataset.tracing === "on") {
      footer.appendChild(document.createTextNode(" · "));
      const trace = el("a", "trace-link", "trace");
      trace.href = "/traces/" + encodeURIComponent(event.run) + "/";
      footer.appendChild(trace);
    }
    return footer;
  }

  const FINAL = [
    "run.completed", "run.failed", "run.cancelled", "run.limit_reached", "run.budget_exceeded",
    "run.interrupted",
  ];

  // What is left of the account's limits, as the server worded it after this answer.
  // No "budget" field: the server could not work it out, so the old text stays.
  function showBudget(budget) {
    if (!budget || !budgetLine) return;
    budgetLine.textContent = budget.display || "";
    budgetLine.hidden = !budget.display;
    budgetLine.classList.toggle("exhausted", Boolean(budget.exhausted));
  }

  function onRunEvent(event) {
    if (event.seq <= (lastSeq[event.run] || 0)) return; // already drawn (replayed twice)
    lastSeq[event.run] = event.seq;
    const follow = nearBottom();
    if (event.type === "run.started") {
      removeEmptyHint();
      showTitle(event.conversation_title);
      drawUserMessage(event.user_message);
      activeRun = event.run;
      setBusy(true);
      turnFor(event.run);
      if (follow) scrollDown();
      return;
    }
    const turn = turnFor(event.run);
    if (event.type === "run.resumed") {
      // The server executing the run stopped and another resumed it from its last
      // checkpoint: the text of the step that was cut is streamed again, so drop it;
      // everything before it stays. (The final event replaces the bubbles anyway.)
      dropCutText(turn);
      activeRun = event.run;
      setBusy(true);
    } else if (event.type === "token") {
      currentSegment(turn).textContent += event.text;
    } else if (event.type === "tool.started") {
      drawToolStarted(turn, event);
    } else if (event.type === "tool.finished") {
      drawToolFinished(turn, event);
    } else if (FINAL.indexOf(event.type) !== -1) {
      drawRunEnd(turn, event);
      showBudget(event.budget);
      if (activeRun === event.run) activeRun = null;
      setBusy(Boolean(activeRun));
    }
    if (follow) scrollDown();
  }

  function onFrame(frame) {
    if (frame.type === "session") {
      const known = activeRun;
      activeRun = frame.active_run || null;
      // Catch up on the run in progress, or on one that ended since the page was drawn.
      [known, activeRun].forEach(function (runId, index, all) {
        if (runId && all.indexOf(runId) === index) {
          send({ type: "resume", run: runId, after_seq: lastSeq[runId] || 0 });
        }
      });
      ready = true;
      setBusy(Boolean(activeRun) || outbox.length > 0);
      while (outbox.length) send(outbox.shift());
    } else if (frame.type === "error") {
      if (pendingUser && frame.code !== "no_active_run") {
        // The message was refused: give its text back so nothing typed is lost.
        if (!input.value) input.value = pendingUser.textContent;
        pendingUser.remove();
        pendingUser = null;
        setBusy(Boolean(activeRun));
      }
      showNotice(frame.message);
    } else if (frame.run) {
      onRunEvent(frame);
    }
  }

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify(frame));
      return true;
    }
    showNotice("Not connected; reconnecting…");
    return false;
  }

  // A message typed while the socket is still (re)connecting waits for it instead of
  // being refused: right after the page loads, that is only a few milliseconds.
  function sendMessage(content) {
    if (ready) return send({ type: "message", content: content });
    outbox.push({ type: "message", content: content });
    return true;
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + window.location.host + "/ws/chat/" + conversationId + "/");
    socket.addEventListener("open", function () {
      retryDelay = 500;
      hideNotice();
    });
    socket.addEventListener("message", function (message) {
      onFrame(JSON.parse(message.data));
    });
    socket.addEventListener("close", function (closed) {
      ready = false;
      if (closed.code === 4401) {
        window.location.href = "/login/?next=" + encodeURIComponent(window.location.pathname);
        return;
      }
      if (closed.code === 4404) {
        showNotice("This conversation is not available.");
        return;
      }
      showNotice("Connection lost; reconnecting…");
      // Jittered, so a restarted server is not met by every browser at once; capped
      // low, so the chat is back (and shows how the run it was drawing ended, resumed
      // on "session") within seconds of the server.
      setTimeout(connect, retryDelay * (0.5 + Math.random() / 2));
      retryDelay = Math.min(retryDelay * 2, 5000);
    });
  }

  form.addEventListener("submit", function (submitted) {
    submitted.preventDefault();
    const content = input.value.trim();
    if (!content || sendButton.disabled) return;
    if (!sendMessage(content)) return;
    if (ready) hideNotice();
    removeEmptyHint();
    pendingUser = el("div", "bubble user pending");
    pendingUser.appendChild(el("div", "content", content));
    list.appendChild(pendingUser);
    input.value = "";
    setBusy(true);
    scrollDown();
  });

  input.addEventListener("keydown", function (key) {
    // Not while an input method is composing: its Enter confirms the characters.
    if (key.key === "Enter" && !key.shiftKey && !key.isComposing) {
      key.preventDefault();
      form.requestSubmit();
    }
  });

  stopButton.addEventListener("click", function () {
    // Once is enough: a second cancel would only earn a "nothing to stop" notice.
    if (send(activeRun ? { type: "cancel", run: activeRun } : { type: "cancel" })) {
      stopButton.disabled = true;
    }
  });

  setBusy(Boolean(activeRun));
  scrollDown();
  connect();
})();
