// A Node.js client on its defaults: GET a URL, print the status and the body.
const http = require("http");
const request = http.get(process.argv[2], { timeout: 5000 }, (res) => {
  let body = "";
  res.on("data", (chunk) => (body += chunk));
  res.on("end", () => console.log(`${res.statusCode} ${body.trim()}`));
});
request.on("timeout", () => request.destroy(new Error("timeout")));
request.on("error", (err) => { console.log(`error: ${err.message}`); process.exitCode = 1; });
