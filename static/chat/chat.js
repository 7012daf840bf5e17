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

  const lastSeq = {};          // run id -> highest seq drawn
  const turns = {};            // run id -> {el, segment, segments, steps}
  let activeRun = chat.dataset.activeRun || null;
  let socket = null;
  let retryDelay = 500;
  let pendingUser = null;      // the bubble drawn before the server confirmed the message

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
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
      list.appendChild(wrapper);
      turns[runId] = { el: wrapper, segment: null, segments: [], steps: {} };
    }
    return turns[runId];
  }

  function currentSegment(turn) {
    if (!turn.segment) {
      const bubble = el("div", "bubble assistant streaming");
      const content = el("div", "content");
      bubble.appendChild(content);
      turn.el.appendChild(bubble);
      turn.segment = content;
      turn.segments.push(content);
    }
    return turn.segment;
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
    const step = el("details", "step running");
    step.dataset.toolCall = event.tool_call_id;
    const summary = el("summary");
    summary.appendChild(el("span", "step-icon", "⚙"));
    summary.appendChild(document.createTextNode(" "));
    summary.appendChild(el("span", "step-name", event.name));
    step.appendChild(summary);
    const body = el("div", "step-body");
    body.appendChild(el("div", "step-label", "Arguments"));
    body.appendChild(el("pre", "step-args", JSON.stringify(event.args, null, 2)));
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
  }

  function drawRunEnd(turn, event) {
    // Swap the streamed plain text for the server's sanitized Markdown rendering.
    const answers = event.messages || [];
    turn.segments.forEach(function (segment, index) {
      segment.parentElement.classList.remove("streaming");
      if (answers[index]) {
        segment.innerHTML = answers[index].html;
        segment.parentElement.dataset.message = answers[index].id;
      }
    });
    const footer = el("div", "run-footer " + event.status);
    footer.dataset.run = event.run;
    if (event.error) footer.appendChild(el("div", "run-error", event.error.message));
    const usage = event.usage || {};
    footer.appendChild(el("span", "usage",
      (usage.total_tokens || 0) + " tokens · " + (usage.input_tokens || 0) + " in / " +
      (usage.output_tokens || 0) + " out"));
    turn.el.appendChild(footer);
  }

  const FINAL = ["run.completed", "run.failed", "run.cancelled", "run.limit_reached"];

  function onRunEvent(event) {
    if (event.seq <= (lastSeq[event.run] || 0)) return; // already drawn (replayed twice)
    lastSeq[event.run] = event.seq;
    if (event.type === "run.started") {
      removeEmptyHint();
      drawUserMessage(event.user_message);
      activeRun = event.run;
      setBusy(true);
      turnFor(event.run);
      return;
    }
    const turn = turnFor(event.run);
    if (event.type === "token") {
      currentSegment(turn).textContent += event.text;
    } else if (event.type === "tool.started") {
      drawToolStarted(turn, event);
    } else if (event.type === "tool.finished") {
      drawToolFinished(turn, event);
    } else if (FINAL.indexOf(event.type) !== -1) {
      drawRunEnd(turn, event);
      if (activeRun === event.run) activeRun = null;
      setBusy(false);
    }
    scrollDown();
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
      setBusy(Boolean(activeRun));
    } else if (frame.type === "error") {
      if (pendingUser && frame.code !== "no_active_run") {
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
      if (closed.code === 4401) {
        window.location.href = "/login/?next=" + encodeURIComponent(window.location.pathname);
        return;
      }
      if (closed.code === 4403 || closed.code === 4404) {
        showNotice("This conversation is not available.");
        return;
      }
      showNotice("Connection lost; reconnecting…");
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 10000);
    });
  }

  form.addEventListener("submit", function (submitted) {
    submitted.preventDefault();
    const content = input.value.trim();
    if (!content || sendButton.disabled) return;
    if (!send({ type: "message", content: content })) return;
    hideNotice();
    removeEmptyHint();
    pendingUser = el("div", "bubble user pending");
    pendingUser.appendChild(el("div", "content", content));
    list.appendChild(pendingUser);
    input.value = "";
    setBusy(true);
    scrollDown();
  });

  input.addEventListener("keydown", function (key) {
    if (key.key === "Enter" && !key.shiftKey) {
      key.preventDefault();
      form.requestSubmit();
    }
  });

  stopButton.addEventListener("click", function () {
    send(activeRun ? { type: "cancel", run: activeRun } : { type: "cancel" });
  });

  setBusy(Boolean(activeRun));
  scrollDown();
  connect();
})();
