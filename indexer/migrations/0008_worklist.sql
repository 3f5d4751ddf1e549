-- UPS-RS worklist (PS3.4 Annex CC, PS3.18 chapter 11): work items, subscriptions and the event outbox.
--
-- * A work item belongs to one data partition; its DICOM JSON is kept whole in attrs (jsonb, so that any
--   attribute, sequences included, can be matched) and in body (the bytes responses are made of), without
--   the Transaction UID, which lives in its own column and is never returned. The typed columns exist only for the searches worklist clients run all
--   the time (state, station, scheduled start, patient, labels) and are derived by worklist.columns.
-- * Work items are separate from the instance index: they never appear in QIDO study searches.
-- * Subscriptions are materialised per work item: a global (worklist) subscription adds a row for every
--   existing non-final work item it matches when made, and for every matching work item created later.
--   Events of a work item therefore go to exactly the rows of ups_subscription.
-- * Events are an outbox written in the transaction that changes the work item. Each subscriber (partition,
--   AE title) has its own dense sequence taken from its ups_subscriber row, which the writer locks as one of
--   its last statements and holds until commit (the change feed's counter scheme, migration 0003): a
--   subscriber's sequences therefore become visible in order and without gaps, and a reader that asks for
--   "after N" never misses or repeats one. acked_sequence is where a subscriber's WebSocket resumes.

CREATE TABLE ups_workitem (
    workitem_key bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partition_key integer NOT NULL REFERENCES partition,
    sop_instance_uid text COLLATE "C" NOT NULL,
    state smallint NOT NULL CHECK (state IN (0, 1, 2, 3)),  -- SCHEDULED, IN PROGRESS, COMPLETED, CANCELED
    transaction_uid text COLLATE "C",
    cancel_requested boolean NOT NULL DEFAULT false,
    priority text COLLATE "C",
    procedure_step_label text COLLATE "C",
    worklist_label text COLLATE "C",
    input_readiness_state text COLLATE "C",
    scheduled_start timestamp,  -- ScheduledProcedureStepStartDateTime as written (offsets not applied)
    expected_completion timestamp,
    patient_id text COLLATE "C",
    patient_name_ci text COLLATE "C",
    patient_name_words text[] COLLATE "C" NOT NULL DEFAULT '{}',
    station_names text[] COLLATE "C" NOT NULL DEFAULT '{}',  -- CodeValue of ScheduledStationNameCodeSequence
    station text COLLATE "C",  -- that code value when it is the only one (the common case), else NULL
    attrs jsonb NOT NULL,
    body bytea NOT NULL,  -- the same data set as the JSON text clients get: no jsonb -> text per response
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (partition_key, sop_instance_uid)
);
-- "the SCHEDULED items of my station, soonest first": the modality's and the AI worker's poll. Items with one
-- station (nearly all) are found in order by a btree, so a page costs ~100 index entries whatever the size of
-- the worklist; the few with several stations by a GIN index of the live ones (SCHEDULED, IN PROGRESS). The
-- search compiler writes state conditions as literals so that the planner can prove they imply the partial
-- index's. station_names' full GIN index serves station searches that name no state.
CREATE INDEX ups_workitem_one_station ON ups_workitem (partition_key, state, station, scheduled_start, workitem_key);
CREATE INDEX ups_workitem_live_stations ON ups_workitem USING gin (station_names)
    WHERE state IN (0, 1) AND station IS NULL;
CREATE INDEX ups_workitem_station ON ups_workitem USING gin (station_names);
CREATE INDEX ups_workitem_state_start ON ups_workitem (partition_key, state, scheduled_start, workitem_key);
CREATE INDEX ups_workitem_patient_id ON ups_workitem (partition_key, patient_id);
CREATE INDEX ups_workitem_patient_name ON ups_workitem (partition_key, patient_name_ci);
CREATE INDEX ups_workitem_label ON ups_workitem (partition_key, procedure_step_label);

CREATE TABLE ups_subscriber (
    partition_key integer NOT NULL REFERENCES partition,
    ae_title text COLLATE "C" NOT NULL,
    last_sequence bigint NOT NULL DEFAULT 0,
    acked_sequence bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (partition_key, ae_title)
);

-- Worklist (filter IS NULL) and Filtered Worklist subscriptions; suspending one deletes its row and keeps
-- the work item subscriptions it made (PS3.4 CC.2.3.3).
CREATE TABLE ups_global_subscription (
    partition_key integer NOT NULL,
    ae_title text COLLATE "C" NOT NULL,
    filtered boolean NOT NULL,
    filter text,  -- the filter query parameter as given; compiled again for every new work item
    deletion_lock boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition_key, ae_title, filtered),
    FOREIGN KEY (partition_key, ae_title) REFERENCES ups_subscriber
);

CREATE TABLE ups_subscription (
    workitem_key bigint NOT NULL REFERENCES ups_workitem,
    partition_key integer NOT NULL,
    ae_title text COLLATE "C" NOT NULL,
    deletion_lock boolean NOT NULL DEFAULT false,
    PRIMARY KEY (workitem_key, ae_title),
    FOREIGN KEY (partition_key, ae_title) REFERENCES ups_subscriber
);
CREATE INDEX ups_subscription_subscriber ON ups_subscription (partition_key, ae_title);

CREATE TABLE ups_event (
    partition_key integer NOT NULL,
    ae_title text COLLATE "C" NOT NULL,
    sequence bigint NOT NULL,
    workitem_uid text COLLATE "C" NOT NULL,
    event_type smallint NOT NULL,  -- PS3.4 Table CC.2.4-1: 1 state report ... 5 assigned
    payload bytea NOT NULL,  -- the event report's DICOM JSON, without the per-subscriber sequence
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (partition_key, ae_title, sequence),
    FOREIGN KEY (partition_key, ae_title) REFERENCES ups_subscriber ON DELETE CASCADE
);
