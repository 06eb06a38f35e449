"""The whole story with a real PACS: Orthanc sends a study to mwm, mwm runs the sample application,
and its DICOM result arrives back in Orthanc both by C-STORE and by STOW-RS."""

from __future__ import annotations

from typing import Any

import synthetic
from peers import Orthanc
from support import SAMPLE_APP, base_config, eventually, wait_jobs

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


async def test_orthanc_to_mwm_to_orthanc(tmp_path, make_service, client_for, orthanc: Orthanc):
    study = synthetic.generate_study(
        tmp_path / "study", series_count=1, instances_per_series=8, rows=64, cols=64, seed=2024
    )
    config = base_config(
        tmp_path,
        # The port Orthanc's configuration gives for its modality "mwm".
        server={"dicom": f"127.0.0.1:{orthanc.mwm_port}"},
        apps=[
            {
                "id": "ct-sample",
                "command": SAMPLE_APP,
                "match": {"called_aet": ["MWM"], "modality": ["CT"]},
                "timeout": "1s",
                "sinks": ["pacs", "web"],
            }
        ],
        sinks=[
            {
                "id": "pacs",
                "kind": "dicom",
                "ae_title": orthanc.ae_title,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            },
            {"id": "web", "kind": "dicomweb", "url": orthanc.dicomweb},
        ],
    )
    service = await make_service(config)
    client = await client_for(service)

    # The study enters Orthanc over its REST API, then Orthanc pushes it to mwm with C-STORE.
    for path in study.paths:
        uploaded = await orthanc.request("POST", "/instances", path.read_bytes())
    study_id = uploaded["ParentStudy"]
    await orthanc.request("POST", "/modalities/mwm/store", {"Resources": [study_id], "Synchronous": True})

    rows = (await client.get("/v1/instances", limit=100))["instances"]
    assert len(rows) == len(study.paths)
    assert {(r["calling_aet"], r["called_aet"]) for r in rows} == {("ORTHANC", "MWM")}

    (job,) = await wait_jobs(client, 1, timeout=60)
    (seg,) = [r for r in (await client.get("/v1/results", job=job["id"]))["results"] if r["sop_class_uid"]]
    assert seg["sop_class_uid"] == SEG_SOP_CLASS
    assert seg["study_instance_uid"] == study.study_uid

    async def delivered() -> list[dict[str, Any]] | None:
        rows = (await client.get("/v1/deliveries", limit=100))["deliveries"]
        dicom = [r for r in rows if r["result_id"] == seg["id"]]
        done = len(dicom) == 2 and all(r["state"] == "delivered" for r in dicom)
        return dicom if done else None

    deliveries = await eventually(delivered, timeout=30, what="the segmentation delivered by both sinks")
    assert {d["sink_id"] for d in deliveries} == {"pacs", "web"}
    skipped = [r for r in (await client.get("/v1/deliveries", limit=100))["deliveries"] if r["result_id"] != seg["id"]]
    assert skipped and all(r["state"] == "skipped" for r in skipped)  # metadata.json is not DICOM

    found = await orthanc.find_instance(seg["sop_instance_uid"])
    assert found is not None, "the segmentation is not in Orthanc"
    series = await orthanc.request("GET", f"/series/{found['ParentSeries']}")
    assert series["ParentStudy"] == study_id  # filed under the study it segments
    assert found["MainDicomTags"]["SOPInstanceUID"] == seg["sop_instance_uid"]
