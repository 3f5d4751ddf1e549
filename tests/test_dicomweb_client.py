"""A third-party client (dicomweb-client, as used by AI pipelines) against a running archive, unchanged."""

from __future__ import annotations

import io
import random

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from bench.synthetic import make_instance, make_study, to_bytes
from tests.fixtures.server import RunningArchive


@pytest.fixture
def client(local_archive: RunningArchive) -> DICOMwebClient:
    return DICOMwebClient(url=local_archive.url)


def test_round_trip_with_dicomweb_client(client: DICOMwebClient) -> None:
    rng = random.Random(42)
    spec = make_study(rng, series_count=2, modalities=["CT", "MR"])
    files = [to_bytes(make_instance(spec, i % 2, i + 1, rng=rng)) for i in range(4)]
    datasets = [pydicom.dcmread(io.BytesIO(f)) for f in files]

    response = client.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == 4
    assert "FailedSOPSequence" not in response

    studies = client.search_for_studies(search_filters={"PatientID": spec.patient_id})
    assert [s["0020000D"]["Value"][0] for s in studies] == [spec.study_uid]
    assert studies[0]["00201208"]["Value"] == [4]
    series = client.search_for_series(spec.study_uid)
    assert sorted(s["0020000E"]["Value"][0] for s in series) == sorted(u for u, _, _ in spec.series)
    instances = client.search_for_instances(spec.study_uid, spec.series[0][0])
    assert len(instances) == 2

    for ds in datasets:
        got = client.retrieve_instance(
            spec.study_uid,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            media_types=(("application/dicom", "*"),),
        )
        assert got.SOPInstanceUID == ds.SOPInstanceUID
        assert got.PixelData == ds.PixelData
        buffer = io.BytesIO()
        got.save_as(buffer, enforce_file_format=True)
        assert pydicom.dcmread(io.BytesIO(buffer.getvalue())).PatientName == ds.PatientName

    metadata = client.retrieve_series_metadata(spec.study_uid, spec.series[0][0])
    assert len(metadata) == 2
    bulk_uri = metadata[0]["7FE00010"]["BulkDataURI"]
    sop = metadata[0]["00080018"]["Value"][0]
    expected = next(d.PixelData for d in datasets if d.SOPInstanceUID == sop)
    assert client.retrieve_bulkdata(bulk_uri, media_types=("application/octet-stream",))[0] == expected

    study = client.retrieve_study(spec.study_uid, media_types=(("application/dicom", "*"),))
    assert sorted(d.SOPInstanceUID for d in study) == sorted(d.SOPInstanceUID for d in datasets)

    client.delete_series(spec.study_uid, spec.series[1][0])
    assert len(client.search_for_instances(spec.study_uid)) == 2
    client.delete_study(spec.study_uid)
    assert client.search_for_studies(search_filters={"PatientID": spec.patient_id}) == []
