import time
from tests.peers import Sink
from tests.conftest import PASSWORD

def test_smoke(make_cmcd):
    with Sink("127.0.0.2") as sink:
        d = make_cmcd({"delivery": {"routes": {"*": f"127.0.0.2:{sink.port}"}}})
        with d.smtp() as c:
            c.sendmail("a@acme.test", ["x@dst.test", "y@dst.test", "z@other.test"], b"From: a@acme.test\r\nSubject: hi\r\n\r\n.dot line\r\nbody\r\n")
        got = sink.wait_for(2, 10)
        print(got)
        print(d.admin("status"))
        time.sleep(1)
        print(d.admin("status"))
        print("\n".join(d.log[-15:]))
