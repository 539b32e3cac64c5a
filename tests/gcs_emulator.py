"""A local Google Cloud Storage for tests: gcp-storage-emulator behind a TLS proxy.

TensorFlow's GCS filesystem talks to `https://www.googleapis.com` and
`https://storage.googleapis.com` only (it has no endpoint setting), through libcurl, which
honours `https_proxy` and `CURL_CA_BUNDLE`. So this module runs, in one child process:

- gcp-storage-emulator (the real JSON/XML API, pure Python), storing objects on disk so a
  restarted emulator still holds them;
- a CONNECT proxy that terminates TLS for the Google hosts with a certificate of a test CA made
  here, and forwards each request to the emulator, fixing two differences between TensorFlow and
  the emulator: TensorFlow's upload PUTs carry both `Content-Length` and
  `Transfer-Encoding: chunked` (the body is de-chunked before forwarding), and the emulator's
  `Location` headers point at plain http (rewritten to https).

`GcsEmulator.env()` is what a process needs to use it: TensorFlow (proxy, CA, a test token, no
metadata-server probe, few retries) and google-cloud-storage (`STORAGE_EMULATOR_HOST`). Only
127.0.0.1 is contacted. Stopping and starting the emulator (same ports, same files) simulates a
storage outage.

Run as a script, it is that child process: `python gcs_emulator.py STATE_DIR PROXY_PORT
EMULATOR_PORT`.
"""

import datetime
import http.client
import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Dict

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def make_certificates(state_dir: str) -> None:
  """Writes ca.pem (a test CA) and server.pem/server.key (the Google hosts, signed by it)."""
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  now = datetime.datetime.now(datetime.timezone.utc)
  start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "neumf-trainer test CA")])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
  key = ec.generate_private_key(ec.SECP256R1())
  leaf = (x509.CertificateBuilder()
          .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GOOGLE_HOSTS[0])]))
          .issuer_name(ca_name).public_key(key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(end)
          .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]),
                         critical=False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                         critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
  pem = serialization.Encoding.PEM
  with open(os.path.join(state_dir, "ca.pem"), "wb") as f:
    f.write(ca.public_bytes(pem))
  with open(os.path.join(state_dir, "server.pem"), "wb") as f:
    f.write(leaf.public_bytes(pem) + ca.public_bytes(pem))
  with open(os.path.join(state_dir, "server.key"), "wb") as f:
    f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class GcsEmulator:
  """Starts, stops and restarts the emulator process; `env()` points processes at it."""

  def __init__(self, state_dir: str):
    self.state_dir = state_dir
    os.makedirs(state_dir, exist_ok=True)
    make_certificates(state_dir)
    self.proxy_port, self.emulator_port = free_port(), free_port()
    self._process = None
    self._log = os.path.join(state_dir, "emulator.log")

  def env(self) -> Dict[str, str]:
    return {
        "https_proxy": f"http://127.0.0.1:{self.proxy_port}",
        "HTTPS_PROXY": f"http://127.0.0.1:{self.proxy_port}",
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": os.path.join(self.state_dir, "ca.pem"),
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "NO_GCE_CHECK": "true",
        "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
        "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
        "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "500000",
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.emulator_port}",
        "GOOGLE_CLOUD_PROJECT": "test-project",
    }

  @property
  def running(self) -> bool:
    return self._process is not None and self._process.poll() is None

  def start(self) -> None:
    if self.running:
      return
    log = open(self._log, "ab")
    self._process = subprocess.Popen(
        [sys.executable, __file__, self.state_dir, str(self.proxy_port),
         str(self.emulator_port)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.time() + 60
    while time.time() < deadline:
      if self._process.poll() is not None:
        raise RuntimeError(f"the GCS emulator exited; see {self._log}")
      try:
        with socket.create_connection(("127.0.0.1", self.proxy_port), timeout=1):
          pass
        connection = http.client.HTTPConnection("127.0.0.1", self.emulator_port, timeout=5)
        connection.request("GET", "/")
        if connection.getresponse().status == 200:
          return
      except OSError:
        time.sleep(0.1)
    raise RuntimeError(f"the GCS emulator did not start within 60 s; see {self._log}")

  def stop(self) -> None:
    if self._process is not None:
      self._process.kill()
      self._process.wait()
      self._process = None

  def create_bucket(self, name: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", self.emulator_port, timeout=10)
    connection.request("POST", "/storage/v1/b?project=test-project", body=f'{{"name": "{name}"}}',
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    if response.status not in (200, 409):
      raise RuntimeError(f"creating bucket {name!r}: HTTP {response.status}")


# ------------------------------------------------------------------------------------------
# The child process.


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
  if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
    body = b""
    while True:
      size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
      if size == 0:
        while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
          pass  # trailers
        return body
      body += handler.rfile.read(size)
      handler.rfile.readline()
  length = int(handler.headers.get("Content-Length") or 0)
  return handler.rfile.read(length) if length else b""


def _forwarder(emulator_port: int):

  class Forwarder(http.server.BaseHTTPRequestHandler):
    """Serves the requests of one TLS connection by forwarding them to the emulator."""
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
      pass

    def _forward(self):
      body = _read_body(self)
      headers = {k: v for k, v in self.headers.items()
                 if k.lower() not in ("transfer-encoding", "content-length", "connection",
                                      "proxy-connection", "expect")}
      headers["Content-Length"] = str(len(body))
      upstream = http.client.HTTPConnection("127.0.0.1", emulator_port, timeout=120)
      try:
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
      except OSError as e:
        self.send_response(502)
        message = f"emulator unreachable: {e}".encode()
        self.send_header("Content-Length", str(len(message)))
        self.end_headers()
        self.wfile.write(message)
        return
      finally:
        upstream.close()
      if os.environ.get("GCS_EMULATOR_DEBUG"):
        print(self.command, self.path, dict(headers), len(body), "->", response.status,
              response.getheaders(), payload[:200], flush=True)
      self.send_response(response.status, response.reason)
      for key, value in response.getheaders():
        if key.lower() in ("transfer-encoding", "content-length", "connection"):
          continue
        if key.lower() == "location":
          value = value.replace("http://", "https://", 1)
        self.send_header(key, value)
      self.send_header("Content-Length", str(len(payload)))
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward

  return Forwarder


def _proxy(state_dir: str, emulator_port: int):
  context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  context.load_cert_chain(os.path.join(state_dir, "server.pem"),
                          os.path.join(state_dir, "server.key"))
  forwarder = _forwarder(emulator_port)

  class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
      pass

    def do_CONNECT(self):
      host = self.path.split(":")[0]
      if host not in GOOGLE_HOSTS:
        self.send_error(403, f"this test proxy only serves {GOOGLE_HOSTS}")
        return
      self.send_response(200, "Connection established")
      self.end_headers()
      self.wfile.flush()
      try:
        tls = context.wrap_socket(self.connection, server_side=True)
      except (ssl.SSLError, OSError):
        self.close_connection = True
        return
      forwarder(tls, self.client_address, self.server)
      self.close_connection = True

  return Proxy


def _serve(state_dir: str, proxy_port: int, emulator_port: int) -> None:
  import logging

  from gcp_storage_emulator import server as emulator_server
  from gcp_storage_emulator import storage as emulator_storage
  from gcp_storage_emulator.handlers import objects

  logging.basicConfig(level=logging.WARNING)
  _patch_empty_uploads(objects)
  _patch_object_paths(emulator_storage)
  emulator = emulator_server.create_server("127.0.0.1", emulator_port, in_memory=False,
                                           data_dir=os.path.join(state_dir, "data"))
  emulator.start()
  proxy = http.server.ThreadingHTTPServer(("127.0.0.1", proxy_port),
                                          _proxy(state_dir, emulator_port))
  proxy.daemon_threads = True
  threading.Thread(target=proxy.serve_forever, daemon=True).start()
  print(f"GCS emulator on 127.0.0.1:{emulator_port}, TLS proxy on 127.0.0.1:{proxy_port}",
        flush=True)
  while True:
    time.sleep(3600)


def _patch_empty_uploads(objects) -> None:
  """The emulator fails on a zero-byte media upload (its body reads as None, not b""), which
  is how TensorFlow creates directory markers: give it an empty body."""
  media_upload = objects._media_upload

  def fixed(request, response, storage):
    if request.data is None:
      request._data = b""
    return media_upload(request, response, storage)

  objects._media_upload = fixed


def _patch_object_paths(storage) -> None:
  """On disk, the emulator stores object `a/` as file `a`, which then cannot also be the
  directory of `a/b` (TensorFlow writes both: directory markers and the objects below them).
  Store each object as one flat file named by its quoted name instead."""

  def object_path(self, bucket_name, file_name):
    return f"{bucket_name}/{urllib.parse.quote(file_name, safe='')}"

  storage.Storage._object_path = object_path


if __name__ == "__main__":
  _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
