//! Message texts in their stored form.
//!
//! Each echo stores a history entry with two messages, the message and its reply, and a row's
//! bytes are what the store pays for most: each byte is written into the WAL, copied back into
//! the database by the checkpointer, and grows the file. So a message is stored packed (see
//! [`iagent_protocol::packed`]): an echo's entry of the benchmark takes less than half the
//! bytes of its texts. A packed text is stored as a BLOB and any other as TEXT, so one column
//! holds both, and rows written before packing read back unchanged.

use iagent_protocol::packed;
pub(super) use iagent_protocol::packed::Unpack;
use rusqlite::Row;
use rusqlite::types::{ToSql, ToSqlOutput, Type, Value, ValueRef};

use crate::MessageText;

/// A message, bound as a statement's parameter in its stored form: packed into a BLOB, or as
/// TEXT when it is a text that cannot be packed. `msg_id` is that of the record the row is
/// (its own `msg_id` column), if any; it must be given again to read the text back.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pack<'a> {
    pub(super) text: &'a MessageText,
    pub(super) msg_id: Option<&'a str>,
}

impl<'a> Pack<'a> {
    /// The stored form, packed into `buffer` (whatever it held before is dropped) when it
    /// can be packed: messages packed one after the other into the same buffer cost no
    /// allocation each, as [`ToSql`] does.
    pub(super) fn stored<'b>(&self, buffer: &'b mut String) -> Stored<'b>
    where
        'a: 'b,
    {
        match self.text {
            MessageText::Json(text) => {
                if packed::pack(text, self.msg_id, buffer) {
                    Stored::Packed(buffer.as_bytes())
                } else {
                    Stored::Text(text)
                }
            }
            MessageText::Message(message) => {
                message.pack_into(self.msg_id, buffer);
                Stored::Packed(buffer.as_bytes())
            }
        }
    }
}

/// A text in its stored form: packed, or as it was. Read back with the `msg_id` it was packed
/// with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored<'a> {
    Text(&'a str),
    Packed(&'a [u8]),
}

impl Stored<'_> {
    /// The bytes it takes stored.
    pub(super) fn len(&self) -> usize {
        match self {
            Self::Text(text) => text.len(),
            Self::Packed(packed) => packed.len(),
        }
    }

    /// The text, unpacked with `msg_id`.
    pub(super) fn text(self, msg_id: Option<&str>) -> Result<String, Unpack> {
        match self {
            Self::Text(text) => Ok(text.to_owned()),
            Self::Packed(packed) => packed::unpack(packed, msg_id),
        }
    }
}

/// As a column holds it: a packed text is a BLOB, any other a TEXT.
impl ToSql for Stored<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Self::Text(text) => ValueRef::Text(text.as_bytes()),
            Self::Packed(packed) => ValueRef::Blob(packed),
        }))
    }
}

impl ToSql for Pack<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        let mut packed = String::new();
        Ok(match self.text {
            MessageText::Json(text) if !packed::pack(text, self.msg_id, &mut packed) => {
                ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes()))
            }
            MessageText::Json(_) => ToSqlOutput::Owned(Value::Blob(packed.into_bytes())),
            MessageText::Message(message) => {
                message.pack_into(self.msg_id, &mut packed);
                ToSqlOutput::Owned(Value::Blob(packed.into_bytes()))
            }
        })
    }
}

/// Reads column `index` of `row` back as the text [`Pack`] stored there with `msg_id`: a BLOB
/// is unpacked where SQLite holds it, a TEXT is the text.
pub(super) fn text(row: &Row<'_>, index: usize, msg_id: Option<&str>) -> rusqlite::Result<String> {
    optional_text(row, index, msg_id)?
        .ok_or_else(|| rusqlite::Error::InvalidColumnType(index, "text".into(), Type::Null))
}

/// Column `index` of `row` in its stored form, without reading it back: `None` for NULL.
pub(super) fn stored<'a>(row: &'a Row<'_>, index: usize) -> rusqlite::Result<Option<Stored<'a>>> {
    Ok(match row.get_ref(index)? {
        ValueRef::Null => None,
        ValueRef::Blob(packed) => Some(Stored::Packed(packed)),
        value => Some(Stored::Text(value.as_str()?)),
    })
}

/// Like [`text`], for a column that may be NULL.
pub(super) fn optional_text(
    row: &Row<'_>,
    index: usize,
    msg_id: Option<&str>,
) -> rusqlite::Result<Option<String>> {
    stored(row, index)?
        .map(|stored| {
            stored.text(msg_id).map_err(|err| {
                rusqlite::Error::FromSqlConversionFailure(index, Type::Blob, Box::new(err))
            })
        })
        .transpose()
}
