-- A study or series row is upserted by every batch that adds to it, with the attributes of the batch's
-- latest instance: usually the very attributes it has. Its members (0010) are a function of attrs alone, so
-- an update that leaves attrs as they are keeps them instead of computing them again (a lone C-STORE paid
-- that twice, once per level).
CREATE OR REPLACE FUNCTION level_members_fill() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.attrs IS NOT DISTINCT FROM OLD.attrs AND NEW.members IS NOT NULL THEN
        RETURN NEW;
    END IF;
    NEW.members := qido_members(NEW.attrs);
    RETURN NEW;
END $$;
