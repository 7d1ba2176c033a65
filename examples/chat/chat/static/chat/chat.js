// channels-lite example chat: one WebSocket per tab, plain JavaScript, no build step.
(() => {
  "use strict";

  const root = document.getElementById("chat");
  if (!root) return;

  const room = root.dataset.room;
  const $ = (id) => document.getElementById(id);
  const messages = $("messages");
  const online = $("online");
  const onlineCount = $("online-count");
  const status = $("status");
  const wsPid = $("ws-pid");
  const messageForm = $("message-form");
  const messageInput = $("message-input");
  const nameForm = $("name-form");
  const nameInput = $("name-input");

  const params = new URLSearchParams(window.location.search);
  let name =
    params.get("name") ||
    window.localStorage.getItem("chat-name") ||
    `guest-${Math.floor(1000 + Math.random() * 9000)}`;
  nameInput.value = name;

  const members = new Map(); // member id -> {id, name, pid}
  let socket = null;
  let me = null;
  let retries = 0;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(state, label) {
    status.className = `status ${state}`;
    status.textContent = label;
    messageInput.disabled = state !== "connected";
    $("send-button").disabled = state !== "connected";
  }

  function append(node) {
    const atBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
    messages.append(node);
    if (atBottom) messages.scrollTop = messages.scrollHeight;
  }

  function system(text) {
    append(el("li", "system", text));
  }

  function renderOnline() {
    online.replaceChildren();
    const sorted = [...members.values()].sort((a, b) => a.name.localeCompare(b.name));
    for (const member of sorted) {
      const li = el("li");
      li.dataset.pid = member.pid;
      li.append(el("span", "name", member.name), el("span", "pid", `pid ${member.pid}`));
      if (me && member.id === me.id) li.append(el("span", "you", "(you)"));
      online.append(li);
    }
    onlineCount.textContent = String(members.size);
  }

  function showMessage(m) {
    const li = el("li", "message");
    li.dataset.id = m.id;
    if (me && m.member_id === me.id) li.classList.add("mine");
    const time = el("time", "", new Date(m.sent_at * 1000).toLocaleTimeString());
    time.dateTime = new Date(m.sent_at * 1000).toISOString();
    const meta = el("div", "meta");
    meta.append(el("span", "author", m.name), time);
    const route = el("div", "route");
    const via = m.via === "websocket" ? "" : ` via ${m.via}`;
    route.append(`sent from pid ${m.origin_pid}${via} · relayed by pid ${m.relayed_by}`);
    if (m.origin_pid !== m.relayed_by) route.append(" ", el("span", "crossed", "⇄ crossed processes"));
    li.append(meta, el("div", "text", m.text), route);
    append(li);
  }

  const handlers = {
    welcome(event) {
      me = event.you;
      retries = 0;
      members.clear();
      members.set(me.id, me);
      wsPid.textContent = event.pid;
      setStatus("connected", "connected");
      system(`You joined #${room} as ${me.name}; your connection is on worker pid ${event.pid}.`);
      renderOnline();
    },
    join(event) {
      members.set(event.member.id, event.member);
      system(`${event.member.name} joined (worker pid ${event.member.pid}).`);
      renderOnline();
    },
    here(event) {
      members.set(event.member.id, event.member);
      renderOnline();
    },
    leave(event) {
      if (members.delete(event.member.id)) system(`${event.member.name} left.`);
      renderOnline();
    },
    message: showMessage,
  };

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${window.location.host}/ws/chat/${encodeURIComponent(room)}/?name=${encodeURIComponent(name)}`;
    const ws = new WebSocket(url);
    socket = ws;
    setStatus("connecting", "connecting…");
    ws.addEventListener("message", (e) => {
      const event = JSON.parse(e.data);
      const handler = handlers[event.type];
      if (handler) handler(event);
    });
    ws.addEventListener("close", () => {
      if (socket !== ws) return; // replaced on purpose (rename)
      if (me) system("Connection lost; reconnecting…");
      me = null;
      members.clear();
      renderOnline();
      wsPid.textContent = "–";
      const delay = Math.min(5000, 500 * 2 ** retries++);
      setStatus("offline", `offline, retrying in ${Math.round(delay / 100) / 10}s`);
      window.setTimeout(connect, delay);
    });
  }

  messageForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = messageInput.value.trim();
    if (!text || !socket || socket.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify({ text }));
    messageInput.value = "";
    messageInput.focus();
  });

  nameForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const wanted = nameInput.value.trim();
    if (!wanted || wanted === name) return;
    name = wanted;
    window.localStorage.setItem("chat-name", name);
    const old = socket;
    socket = null; // so the old socket's close handler does not reconnect
    if (old) old.close(); // the old connection says goodbye...
    connect(); // ...and a new one announces the new name
  });

  connect();
})();
