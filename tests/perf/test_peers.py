"""The peer proxies' configs and certificates (mutual TLS 1.3), and their listeners."""
import ssl

from cryptography import x509

from shoal.perf import peers

FORWARDS = (peers.Forward("stream", 20001, 20002, 5201), peers.Forward("rr", 20003, 20004, 11111))



def test_certificates_chain_and_names(tmp_path):
    certs = peers.mint_certificates(tmp_path, "10.244.2.10")
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert peers.SERVER_NAME in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.244.2.10"]
    # The files load as the TLS libraries will load them (key matches cert, PEM bundles parse).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.server_pem)
    ctx.load_cert_chain(certs.client_cert, certs.client_key)
    # Readable by the pods' own uids (throwaway bench keys; the run folder is removed after).
    assert oct(certs.client_key.stat().st_mode & 0o777) == "0o644"



def test_peer_configs_require_mutual_tls13(tmp_path):
    certs = peers.mint_certificates(tmp_path, "10.244.2.10")
    client = peers.stunnel_client_config(certs, "10.244.2.10", FORWARDS)
    assert "accept = 127.0.0.1:20001" in client and "connect = 10.244.2.10:20002" in client
    assert client.count("verifyChain = yes") == 2 and "sslVersionMin = TLSv1.3" in client
    server = peers.stunnel_server_config(certs, "10.244.2.10", FORWARDS)
    assert "accept = 10.244.2.10:20004" in server and "connect = 127.0.0.1:11111" in server
    assert server.count("requireCert = yes") == 2
    hclient = peers.haproxy_client_config(certs, "10.244.2.10", FORWARDS)
    assert "bind 127.0.0.1:20003" in hclient and "verify required verifyhost perf-server" in hclient
    hserver = peers.haproxy_server_config(certs, "10.244.2.10", FORWARDS)
    assert f"bind 10.244.2.10:20002 ssl crt {certs.server_pem} ca-file {certs.ca} verify required" in hserver
    assert "ssl-min-ver TLSv1.3" in hserver and "server local 127.0.0.1:5201" in hserver



def test_listening_reads_ss_output():
    out = ("LISTEN 0 128 10.244.2.10:20002 0.0.0.0:*\n"
           "LISTEN 0 4096 *:5201 *:*\n"
           "LISTEN 0 4096 127.0.0.1:20001 0.0.0.0:*\n")
    assert peers.listening(out, "10.244.2.10", 20002)
    assert peers.listening(out, "0.0.0.0", 5201)            # iperf3's dual-stack socket
    assert peers.listening(out, "127.0.0.1", 20001)
    assert not peers.listening(out, "127.0.0.1", 2000)      # no prefix matches
    assert not peers.listening(out, "10.244.2.10", 20001)   # bound to another address


def test_forwards_take_consecutive_port_pairs_from_the_base():
    made = peers.forwards(20000, (("stream", 5201), ("rr", 11111)))
    assert made == FORWARDS
    assert peers.forwards(23000, ()) == ()
