"""Label and field selectors (skyshift.api.selectors): grammar, matching and errors."""
import pytest

from skyshift.api.errors import InvalidError
from skyshift.api.selectors import FieldSelector, LabelSelector
from skyshift.v1 import api_pb2
from skyshift.v1 import objects_pb2 as pb

WEB = {"app": "web", "tier": "frontend", "example.com/team": "ml"}
DB = {"app": "db", "tier": "backend"}
BARE = {}


@pytest.mark.parametrize("text, web, db, bare", [
    ("", True, True, True),
    ("app=web", True, False, False),
    ("app==web", True, False, False),
    ("app = web", True, False, False),
    ("app!=web", False, True, True),
    ("app in (web,db)", True, True, False),
    ("app in ( web , cache )", True, False, False),
    ("app notin (web)", False, True, True),
    ("app", True, True, False),
    ("!app", False, False, True),
    ("! app", False, False, True),
    ("app,tier=backend", False, True, False),
    ("app in (web,db),tier notin (backend)", True, False, False),
    ("example.com/team=ml", True, False, False),
    ("example.com/team", True, False, False),
    ("app=web,app=db", False, False, False),
    (" app=web , tier=frontend ", True, False, False),
    ("app=", False, False, False),
])
def test_label_selector_grammar(text, web, db, bare):
    selector = LabelSelector.parse(text)
    assert (selector.matches(WEB), selector.matches(DB), selector.matches(BARE)) == (web, db, bare)
    assert selector.empty() == (text == "")


def test_empty_value_matches_an_empty_label():
    assert LabelSelector.parse("app=").matches({"app": ""})
    assert not LabelSelector.parse("app!=").matches({"app": ""})


@pytest.mark.parametrize("text", [
    "app in ()", "app in (", "app in (web", "app in web", "app notin", "=web", "app=web=db", "app web",
    "app=(web)", "app in (web))", "-app=web", "app-=web", "app=we b", "app =! web", "in (a)", "app>1",
    "app=web,,=x", "!app=web",
])
def test_malformed_label_selectors_name_the_field(text):
    with pytest.raises(InvalidError) as caught:
        LabelSelector.parse(text)
    assert caught.value.field == "label_selector"


def test_label_selector_from_terms():
    term = pb.PlacementTerm(match_labels={"app": "web"},
                            match_expressions=[pb.MatchExpression(key="tier", operator="NotIn", values=["backend"]),
                                               pb.MatchExpression(key="example.com/team", operator="Exists")])
    selector = LabelSelector.from_terms(term.match_labels, term.match_expressions)
    assert selector.matches(WEB) and not selector.matches(DB) and not selector.matches(BARE)
    with pytest.raises(InvalidError) as caught:
        LabelSelector.from_terms({}, [pb.MatchExpression(key="a", operator="Near")], field="spec.selector")
    assert caught.value.field == "spec.selector.match_expressions[0].operator"


# ---------------------------------------------------------------- field selectors


def replica(name="r1", cluster="c1", phase="RUNNING", rank=0, gang=False):
    obj = pb.Replica()
    obj.metadata.name, obj.metadata.namespace = name, "default"
    obj.spec.cluster, obj.spec.rank, obj.spec.template.gang = cluster, rank, gang
    obj.status.phase = phase
    return obj


def field_selector(text, message=pb.Replica):
    return FieldSelector.parse(text, message.DESCRIPTOR)


def test_string_fields():
    assert field_selector("metadata.name=r1").matches(replica())
    assert not field_selector("metadata.name=r2").matches(replica())
    assert field_selector("spec.cluster=c1,status.phase!=FAILED").matches(replica())
    assert not field_selector("spec.cluster==c1,status.phase!=RUNNING").matches(replica())
    assert field_selector("spec.cluster=").matches(replica(cluster=""))  # unbound replicas
    assert field_selector("spec.cluster!=").matches(replica(cluster="c9"))


def test_int_fields():
    assert field_selector("spec.rank=3").matches(replica(rank=3))
    assert not field_selector("spec.rank=3").matches(replica(rank=4))
    assert field_selector("spec.rank!=0").matches(replica(rank=1))
    job = pb.Job()
    job.spec.replicas = 2
    assert FieldSelector.parse("spec.replicas=2", pb.Job.DESCRIPTOR).matches(job)


def test_bool_fields():
    assert field_selector("spec.template.gang=true").matches(replica(gang=True))
    assert field_selector("spec.template.gang=false").matches(replica(gang=False))
    assert not field_selector("spec.template.gang=true").matches(replica(gang=False))


def test_enum_fields_compare_by_name():
    event = api_pb2.WatchEvent(type=api_pb2.WatchEvent.DELETED, resource_version=5)
    assert field_selector("type=DELETED", api_pb2.WatchEvent).matches(event)
    assert not field_selector("type=ADDED", api_pb2.WatchEvent).matches(event)
    assert field_selector("type!=ADDED,resource_version=5", api_pb2.WatchEvent).matches(event)


def test_equalities_are_exposed_for_indexes():
    selector = field_selector("spec.cluster=c1,status.phase!=FAILED,metadata.name==r1")
    assert selector.equalities == {"spec.cluster": "c1", "metadata.name": "r1"}
    assert field_selector("").empty()


@pytest.mark.parametrize("text, problem", [
    ("spec.bogus=1", "not a selectable field"),
    ("metadata.labels=x", "not a selectable field"),      # a map
    ("metadata.finalizers=x", "not a selectable field"),  # a repeated field
    ("spec.template=x", "not a scalar field"),            # a message
    ("spec", "cannot parse"),
    ("=x", "cannot parse"),
    ("spec.cluster>c1", "cannot parse"),
    ("metadata..name=x", "not a selectable field"),
    ("spec.cluster.name=x", "not a selectable field"),    # below a scalar
])
def test_malformed_field_selectors_name_the_field(text, problem):
    with pytest.raises(InvalidError) as caught:
        field_selector(text)
    assert caught.value.field == "field_selector"
    assert problem in str(caught.value)
