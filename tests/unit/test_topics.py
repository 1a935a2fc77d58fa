from common import topics


def test_matches():
    assert topics.matches("fbm/v1/jobs/+", "fbm/v1/jobs/j")
    assert not topics.matches("fbm/v1/jobs/+", "fbm/v1/jobs/j/model")
    assert topics.matches("fbm/v1/#", "fbm/v1")
    assert topics.matches("fbm/v1/jobs/+/model/c/+", "fbm/v1/jobs/j/model/c/3")
    assert not topics.matches("a/b", "a")


def test_writers_and_chunk_topics():
    assert topics.writer_of(topics.update("o", "j", "n1")) == "n1"
    assert topics.writer_of(topics.status("n1")) == "n1"
    assert topics.writer_of(topics.replies("n1", "o")) == "n1"
    assert topics.writer_of(topics.requests("n1")) is None
    assert topics.writer_of(topics.model("o", "j")) is None
    assert topics.base_of_chunk(topics.chunk(topics.model("o", "j"), 12)) == topics.model("o", "j")
    assert topics.base_of_chunk(topics.model("o", "j")) is None
    assert topics.job_of(topics.events("o", "j7")) == "j7"
