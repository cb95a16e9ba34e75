# dkimpy (Debian's python3-dkim, run with /usr/bin/python3) for the DKIM corpus and
# the DMARC and ARC tests: one process signs a whole batch, one verifies it.
#
#   dkimpy.py sign   < {"cases": [{"id", "message" (base64), "steps": [...]}]}
#                    > {"keys": {name: txt}, "signed": {id: base64}}
#   dkimpy.py verify PORT < {id: base64}
#                    > {id: [{"ok": bool, "err": str|null, "d": str, "s": str}]}
#   dkimpy.py arc-sign < {"messages": [base64], "hops": [{"srv_id", "domain",
#                          "selector", "results"}]}
#                    > {"keys": {name: txt}, "messages": [base64]}
#   dkimpy.py arc-verify PORT < {id: base64}
#                    > {id: {"cv": "pass"|"fail"|"none"|null, "reason": str}}
#
# arc-sign plays each hop in turn: it puts the hop's Authentication-Results on top
# (RFC 8617 seals what the hop recorded) and seals with dkim.arc_sign (RSA 2048).
#
# Keys are made here: RSA with openssl (1024 and 2048 bits), Ed25519 with PyNaCl
# (a dependency of python3-dkim). Each signing step names a key, selector, domain,
# canonicalization, the header fields to sign (repeat a name to oversign), and
# optionally l= and explicit t=/x=. Steps without t=/x= go through dkim.sign();
# the others through the same DKIM.gen_header() that dkim.sign() ends in, which is
# the only way to put x= into a dkimpy signature.
import base64
import json
import subprocess
import sys
import time

import dkim
import dkim.canonicalization
import dkim.crypto
import nacl.encoding
import nacl.signing


def rsa_key(bits):
    pem = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}"],
        check=True, capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubout", "-outform", "DER"],
                         input=pem, check=True, capture_output=True).stdout
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def ed25519_key():
    sk = nacl.signing.SigningKey.generate()
    private = sk.encode(encoder=nacl.encoding.Base64Encoder)
    public = sk.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    return private, "v=DKIM1; k=ed25519; p=" + public


def sign_step(msg, step, keys):
    private, _ = keys[step["key"]]
    alg = b"ed25519-sha256" if step["key"] == "ed25519" else b"rsa-sha256"
    sel, dom = step["selector"].encode(), step["domain"].encode()
    hc, bc = step["canon"].encode().split(b"/")
    include = [h.encode() for h in step["headers"]]
    if step.get("t") is None and step.get("x") is None:
        return dkim.sign(msg, sel, dom, private, canonicalize=(hc, bc),
                         include_headers=include, length=step.get("length", False),
                         signature_algorithm=alg)
    d = dkim.DKIM(msg, signature_algorithm=alg)
    if alg == b"ed25519-sha256":
        pk = nacl.signing.SigningKey(private, encoder=nacl.encoding.Base64Encoder)
    else:
        pk = dkim.crypto.parse_pem_private_key(private)
    policy = dkim.canonicalization.CanonicalizationPolicy.from_c_value(hc + b"/" + bc)
    include = tuple(h.lower() for h in include)
    d.hasher = dkim.HASH_ALGORITHMS[alg]
    body = policy.canonicalize_body(d.body)
    bh = base64.b64encode(d.hasher(body).digest())
    t = step.get("t") or int(time.time())
    fields = [(b"v", b"1"), (b"a", alg), (b"c", hc + b"/" + bc), (b"d", dom),
              (b"i", b"@" + dom)]
    if step.get("length"):
        fields.append((b"l", str(len(body)).encode()))
    fields += [(b"q", b"dns/txt"), (b"s", sel), (b"t", str(t).encode())]
    if step.get("x") is not None:
        fields.append((b"x", str(step["x"]).encode()))
    fields += [(b"h", b" : ".join(include)), (b"bh", bh), (b"b", b"0" * 60)]
    return b"DKIM-Signature: " + d.gen_header(fields, include, policy, b"DKIM-Signature", pk)


def sign(spec):
    keys = {"rsa1024": rsa_key(1024), "rsa2048": rsa_key(2048), "ed25519": ed25519_key()}
    signed = {}
    for case in spec["cases"]:
        msg = base64.b64decode(case["message"])
        for step in case["steps"]:
            msg = sign_step(msg, step, keys) + msg
        signed[case["id"]] = base64.b64encode(msg).decode()
    return {"keys": {k: v[1] for k, v in keys.items()}, "signed": signed}


def txt_func(port):
    """A dnsfunc for dkimpy that asks the test DNS server only."""
    import dns.resolver
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = port

    def txt(name, timeout=5):
        n = name.decode() if isinstance(name, bytes) else name
        try:
            ans = res.resolve(n, "TXT", lifetime=timeout)
        except Exception:
            return None
        for rr in ans:
            return b"".join(rr.strings)
        return None
    return txt


def verify(port, messages):
    txt = txt_func(port)
    out = {}
    for cid, b64 in messages.items():
        msg = base64.b64decode(b64)
        n = sum(1 for k, v in dkim.DKIM(msg).headers if k.lower() == b"dkim-signature")
        results = []
        for i in range(n):
            v = dkim.DKIM(msg)
            err = None
            try:
                ok = bool(v.verify(idx=i, dnsfunc=txt))
            except Exception as e:
                ok, err = False, repr(e)
            dom = v.domain.decode() if isinstance(v.domain, bytes) else str(v.domain)
            sel = v.selector.decode() if isinstance(v.selector, bytes) else str(v.selector)
            results.append({"ok": ok, "err": err, "d": dom, "s": sel})
        out[cid] = results
    return out


def arc_sign(spec):
    private, public = rsa_key(2048)
    out = []
    for b64 in spec["messages"]:
        msg = base64.b64decode(b64)
        for hop in spec["hops"]:
            msg = b"Authentication-Results: " + hop["results"].encode() + b"\r\n" + msg
            headers = dkim.arc_sign(msg, hop["selector"].encode(), hop["domain"].encode(),
                                    private, hop["srv_id"].encode())
            if not headers:
                raise SystemExit("arc_sign made no ARC set for " + hop["srv_id"])
            msg = b"".join(headers) + msg
        out.append(base64.b64encode(msg).decode())
    return {"keys": {"rsa2048": public}, "messages": out}


def arc_verify(port, messages):
    txt = txt_func(port)
    out = {}
    for cid, b64 in messages.items():
        cv, _results, reason = dkim.arc_verify(base64.b64decode(b64), dnsfunc=txt)
        out[cid] = {"cv": cv.decode() if isinstance(cv, bytes) else cv, "reason": str(reason)}
    return out


if __name__ == "__main__":
    data = json.load(sys.stdin)
    mode = sys.argv[1]
    if mode == "sign":
        json.dump(sign(data), sys.stdout)
    elif mode == "verify":
        json.dump(verify(int(sys.argv[2]), data), sys.stdout)
    elif mode == "arc-sign":
        json.dump(arc_sign(data), sys.stdout)
    elif mode == "arc-verify":
        json.dump(arc_verify(int(sys.argv[2]), data), sys.stdout)
    else:
        raise SystemExit("unknown mode " + mode)
