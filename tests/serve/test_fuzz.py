"""Fuzz every operation of the server's own OpenAPI spec (hypothesis): no input may give a 5xx.

Parameters are drawn from each one's schema and from outside it (wrong types, huge and negative numbers,
any unicode, control characters), bodies from arbitrary JSON and bytes. Bounded: a few hundred requests.
"""

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

EXAMPLES = 25  # per operation: about 250 requests in all

ANY_TEXT = st.text(max_size=300)
WILD = st.one_of(
    ANY_TEXT,
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "-", "+", "1e309", "NaN", "../../etc/passwd", "%00", "\x00", "true", "0x10"]),
)


def value_for(schema: dict):
    kinds = {s.get("type") for s in schema.get("anyOf", [schema])}
    typed = []
    if "integer" in kinds:
        typed.append(st.integers(-(2**64), 2**64).map(str))
    if "boolean" in kinds:
        typed.append(st.sampled_from(["true", "false", "1", "0", "yes"]))
    if "string" in kinds:
        typed.append(ANY_TEXT)
    return st.one_of(*typed, WILD)


def query_operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            params = [p for p in op.get("parameters", []) if p["in"] == "query"]
            if method == "get":
                yield path, params


def request_for(operation):
    path, params = operation
    optional = {p["name"]: value_for(p.get("schema", {})) for p in params} | {"junk": WILD}
    return st.tuples(st.just(path), st.fixed_dictionaries({}, optional=optional))


def test_no_5xx_on_any_query_parameter(http):
    spec = http.get("/openapi.json").json()
    operations = list(query_operations(spec))
    assert {p for p, _ in operations} >= {"/search", "/thumbnail", "/neighbours", "/item"}

    @settings(max_examples=EXAMPLES * len(operations), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.sampled_from(operations).flatmap(request_for))
    def check(request):
        path, query = request
        response = http.get(path, params=query)
        assert response.status_code < 500, (path, query, response.text)

    check()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    body=st.one_of(
        st.fixed_dictionaries(
            {"vector": st.lists(st.floats(), max_size=40), "k": st.integers(-(2**40), 2**40)}
        ),
        st.recursive(
            st.none() | st.booleans() | st.floats() | ANY_TEXT,
            lambda c: st.lists(c) | st.dictionaries(ANY_TEXT, c),
            max_leaves=10,
        ),
    )
)
@example(body=[None, [True, "x", float("nan")]])  # a NaN echoed back in the 422 once made it a 500
def test_no_5xx_on_any_vector_body(http_session, body):
    import json

    response = http_session.post(
        "/search/vector",
        content=json.dumps(body, allow_nan=True),
        headers={"content-type": "application/json"},
    )
    assert response.status_code < 500, (body, response.text)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.binary(max_size=2048), k=WILD, q=st.one_of(st.none(), ANY_TEXT))
def test_no_5xx_on_any_upload(http_session, data, k, q):
    form = {"k": k, **({"q": q} if q is not None else {})}
    response = http_session.post("/search", files={"image": ("x", data)}, data=form)
    assert response.status_code < 500, (k, q, response.text)
