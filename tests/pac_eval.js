// Evaluates PAC scripts as a browser does, for tests/test_pac.py.
//
// stdin: a JSON list of jobs {"pac": TEXT, "cases": [[url, host], ...], "isInNetEx": bool};
// stdout: a JSON list with, per job, the list of FindProxyForURL results (a string each),
// or "ERROR: ..." for a case that threw.  Each script runs in a fresh context holding
// the standard PAC helpers, written here after their specification (Netscape's PAC
// functions, Microsoft's isInNetEx as Chromium has it).  dnsResolve throws: a PAC
// that resolves a name fails the test (isInNet calls it for a host that is not a
// dotted quad, as browsers' isInNet does).
"use strict";
const vm = require("vm");

function dottedQuad(text) {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(text);
  if (!m) return null;
  const parts = m.slice(1).map(Number);
  return parts.every((p) => p <= 255) ? parts : null;
}

function ipv6Groups(text) {
  // 8 numbers of 16 bits, or null; "::" and a trailing dotted quad allowed.
  if (!/^[0-9a-f:.]+$/i.test(text) || text.split("::").length > 2) return null;
  const expand = (side) => {
    if (side === "") return [];
    const out = [];
    for (const piece of side.split(":")) {
      if (piece.includes(".")) {
        const q = dottedQuad(piece);
        if (!q) return null;
        out.push((q[0] << 8) | q[1], (q[2] << 8) | q[3]);
      } else if (/^[0-9a-f]{1,4}$/i.test(piece)) {
        out.push(parseInt(piece, 16));
      } else {
        return null;
      }
    }
    return out;
  };
  const halves = text.split("::");
  const head = expand(halves[0]);
  const tail = halves.length === 2 ? expand(halves[1]) : [];
  if (head === null || tail === null) return null;
  if (halves.length === 1) return head.length === 8 ? head : null;
  if (head.length + tail.length > 7) return null;
  return head.concat(new Array(8 - head.length - tail.length).fill(0), tail);
}

function bits(groups, width) {
  return groups.map((g) => g.toString(2).padStart(width, "0")).join("");
}

function helpers(withEx) {
  const env = {
    dnsResolve(host) {
      throw new Error("dnsResolve(" + JSON.stringify(host) + ") called: a PAC must not resolve names");
    },
    myIpAddress() {
      throw new Error("myIpAddress() called");
    },
    isPlainHostName(host) {
      return host.indexOf(".") < 0 && ipv6Groups(host) === null;
    },
    dnsDomainIs(host, domain) {
      return host.length >= domain.length && host.substring(host.length - domain.length) === domain;
    },
    shExpMatch(text, pattern) {
      // As browsers do it: "." literal, "*" any run, "?" any one character, anchored.
      const source = pattern.replace(/\./g, "\\.").replace(/\*/g, ".*").replace(/\?/g, ".");
      return new RegExp("^" + source + "$").test(text);
    },
    isInNet(host, pattern, mask) {
      let address = dottedQuad(host);
      if (address === null) {
        const resolved = env.dnsResolve(host);
        if (resolved === null) return false;
        address = dottedQuad(resolved);
      }
      const net = dottedQuad(pattern);
      const m = dottedQuad(mask);
      if (address === null || net === null || m === null) return false;
      return address.every((a, i) => (a & m[i]) === (net[i] & m[i]));
    },
  };
  if (withEx) {
    env.isInNetEx = function (host, prefix) {
      const slash = prefix.indexOf("/");
      if (slash < 0) return false;
      const length = Number(prefix.substring(slash + 1));
      const base = prefix.substring(0, slash);
      const v4 = dottedQuad(host);
      const v4net = dottedQuad(base);
      if (v4 !== null && v4net !== null) {
        return bits(v4, 8).substring(0, length) === bits(v4net, 8).substring(0, length);
      }
      const v6 = ipv6Groups(host);
      const v6net = ipv6Groups(base);
      if (v6 === null || v6net === null) return false;
      return bits(v6, 16).substring(0, length) === bits(v6net, 16).substring(0, length);
    };
  }
  return env;
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  const results = JSON.parse(input).map((job) => {
    const context = vm.createContext(helpers(job.isInNetEx !== false));
    vm.runInContext(job.pac, context, { filename: "proxy.pac" });
    return job.cases.map(([url, host]) => {
      try {
        const answer = context.FindProxyForURL(url, host);
        return typeof answer === "string" ? answer : "ERROR: not a string: " + String(answer);
      } catch (e) {
        return "ERROR: " + e.message;
      }
    });
  });
  process.stdout.write(JSON.stringify(results));
});
