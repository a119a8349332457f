//! Building `QueueMessage` objects from stored messages, fast.
//!
//! `QueueMessage` and `MessageAttributes` stay the frozen dataclasses of `types.py`, whose fields
//! are slots. They are built as `object.__new__` builds them (the class's `tp_alloc`), each
//! field written into its slot at the offset its member descriptor gives (what the descriptor's
//! `__set__`, and so a frozen dataclass's own `__init__` through `object.__setattr__`, would
//! store there), and datetimes from their calendar fields, so building a message costs well
//! under a microsecond. Should a field not be such a slot, it is set with
//! `PyObject_GenericSetAttr` instead. `tests/test_core_store.py` checks that the attributes set
//! here are exactly the dataclasses' fields.
//!
//! Messages are built from [`MessageView`]s copied out of the store under its lock, after the
//! lock is released: constructing objects may run the garbage collector, and with it arbitrary
//! finalizers that might call back into the store.

use std::sync::{Mutex, OnceLock};

use pyo3::exceptions::{PyAttributeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDateTime, PyList, PyString, PyTuple, PyType, PyTzInfo};
use pyo3::{ffi, intern};

use crate::clock::civil_from_days;
use crate::errors::CoreError;
use crate::py::args::repr_of;
use crate::py::errors::to_py_err;
use crate::py::requests::Payload;
use crate::store::{
    format_message_id_into, format_message_id_tail, ReceiptHandle, StoredMessage, MESSAGE_ID_LEN,
};

// ----- classes of types.py -----------------------------------------------------------------

macro_rules! types_class {
    ($vis:vis $fn_name:ident, $class:literal) => {
        $vis fn $fn_name(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
            static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
            CLASS.import(py, "llm_queue_dispatcher.types", $class)
        }
    };
}

types_class!(pub(crate) llm_request_class, "LLMRequest");
types_class!(pub(crate) token_info_class, "TokenInfo");
types_class!(queue_message_class, "QueueMessage");
types_class!(message_attributes_class, "MessageAttributes");

/// The fields of `MessageAttributes`, in the order [`Maker::make`] takes their values.
const ATTRIBUTE_FIELDS: [&str; 5] =
    ["message_id", "receipt_handle", "enqueued_at", "receive_count", "first_received_at"];
/// The fields of `QueueMessage`, likewise.
const MESSAGE_FIELDS: [&str; 3] = ["id", "payload", "attributes"];

/// Builds instances of one of the dataclasses without running its `__init__`, from the values
/// of its fields.
struct Maker<const N: usize> {
    class: Py<PyType>,
    how: How<N>,
}

enum How<const N: usize> {
    /// Each field is a slot of the class itself at this offset, holding an object (`T_OBJECT_EX`,
    /// writable); the class allocates with `tp_alloc`, zeroed: the slots start empty.
    Slots([usize; N]),
    /// `object.__new__`, then `object.__setattr__` of each field by name.
    SetAttr([Py<PyString>; N]),
}

impl<const N: usize> Maker<N> {
    fn of(class: &Bound<'_, PyType>, names: [&str; N]) -> PyResult<Self> {
        let py = class.py();
        let how = match slot_offsets(class, names)? {
            Some(offsets) => How::Slots(offsets),
            None => How::SetAttr(names.map(|name| PyString::intern(py, name).unbind())),
        };
        Ok(Self { class: class.clone().unbind(), how })
    }

    /// An instance with `values[i]` as its field `i`.
    fn make<'py>(&self, py: Python<'py>, values: [&Bound<'py, PyAny>; N]) -> PyResult<Bound<'py, PyAny>> {
        let class = self.class.bind(py);
        match &self.how {
            How::Slots(offsets) => {
                let object = alloc_instance(class)?;
                for (&offset, value) in offsets.iter().zip(values) {
                    // SAFETY: `slot_offsets` checked that `offset` is an object slot inside the
                    // class's instances, and `object` is a fresh, zeroed instance of exactly
                    // that class: the slot is empty, so it takes a new reference and nothing is
                    // overwritten.
                    unsafe {
                        let slot = slot_at(&object, offset);
                        debug_assert!((*slot).is_null());
                        *slot = value.clone().into_ptr();
                    }
                }
                Ok(object)
            }
            How::SetAttr(names) => {
                let object = new_instance(class)?;
                for (name, value) in names.iter().zip(values) {
                    set_field(&object, name.bind(py), value)?;
                }
                Ok(object)
            }
        }
    }
}

/// The offsets of the named fields when each is an object slot (`__slots__`) of `class` itself,
/// writable, within its instances, and `class` allocates plain zeroed instances of a fixed size;
/// None otherwise (a field kept in the instance's dict, a property, a different layout).
fn slot_offsets<const N: usize>(class: &Bound<'_, PyType>, names: [&str; N]) -> PyResult<Option<[usize; N]>> {
    let py = class.py();
    // SAFETY: a live type object; reading plain fields of a full (non-limited) type object.
    let (itemsize, has_alloc) =
        unsafe { ((*class.as_type_ptr()).tp_itemsize, (*class.as_type_ptr()).tp_alloc.is_some()) };
    if itemsize != 0 || !has_alloc {
        return Ok(None);
    }
    let own = class.getattr(intern!(py, "__dict__"))?;
    let mut offsets = [0usize; N];
    for (name, offset) in names.iter().zip(&mut offsets) {
        let Ok(mut descriptor) = own.get_item(name) else { return Ok(None) };
        if let Ok(lazy) = descriptor.cast::<PyAttributesSlot>() {
            descriptor = lazy.get().slot.bind(py).clone();
        }
        match object_slot(&descriptor) {
            Some((owner, at)) if owner == class.as_type_ptr() as usize => *offset = at,
            _ => return Ok(None),
        }
    }
    Ok(Some(offsets))
}

/// `(the class, the offset)` of the slot a member descriptor gives access to, when it is a
/// writable object slot (`T_OBJECT_EX`) inside the class's instances (their fixed part); None
/// for any other descriptor.
fn object_slot(descriptor: &Bound<'_, PyAny>) -> Option<(usize, usize)> {
    // SAFETY: comparing an object's type with the static type of member descriptors.
    let is_member = unsafe {
        std::ptr::eq(ffi::Py_TYPE(descriptor.as_ptr()), std::ptr::addr_of_mut!(ffi::PyMemberDescr_Type))
    };
    if !is_member {
        return None;
    }
    // SAFETY: an object of exactly `member_descriptor`'s type is a `PyMemberDescrObject`, whose
    // `d_member` points at the `PyMemberDef` of the slot (`CPython` 3.10 and later alike; PyO3
    // names the pointee's type differently before 3.11, the pointer is the same), and whose
    // `d_type` is the live class that declared it.
    let (owner, member, basicsize) = unsafe {
        let descriptor = descriptor.as_ptr().cast::<ffi::PyMemberDescrObject>();
        let owner = (*descriptor).d_common.d_type;
        (owner, &*(*descriptor).d_member.cast::<ffi::PyMemberDef>(), (*owner).tp_basicsize)
    };
    let (at, basicsize) = (usize::try_from(member.offset).ok()?, usize::try_from(basicsize).ok()?);
    let fits = at >= std::mem::size_of::<ffi::PyObject>()
        && at % std::mem::align_of::<*mut ffi::PyObject>() == 0
        && at + std::mem::size_of::<*mut ffi::PyObject>() <= basicsize;
    (member.type_code == ffi::Py_T_OBJECT_EX && member.flags & ffi::Py_READONLY == 0 && fits)
        .then_some((owner as usize, at))
}

/// The slot at `offset` of `object`.
///
/// # Safety
/// `offset` is that of an object slot of `object`'s class or of a base (see [`object_slot`]).
unsafe fn slot_at(object: &Bound<'_, PyAny>, offset: usize) -> *mut *mut ffi::PyObject {
    object.as_ptr().byte_add(offset).cast::<*mut ffi::PyObject>()
}

/// What `object.__new__(cls)` returns for a class without a per-instance dict: a zeroed instance
/// from the class's `tp_alloc` (tracked by the collector when the class is).
fn alloc_instance<'py>(class: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyAny>> {
    let py = class.py();
    // SAFETY: `slot_offsets` checked that the class has a `tp_alloc`; it is called as
    // `object.__new__` calls it, with no items.
    unsafe {
        let alloc = (*class.as_type_ptr()).tp_alloc.ok_or_else(|| PyErr::fetch(py))?;
        Bound::from_owned_ptr_or_err(py, alloc(class.as_type_ptr(), 0))
    }
}

fn attributes_maker(py: Python<'_>) -> PyResult<&Maker<5>> {
    static MAKER: PyOnceLock<Maker<5>> = PyOnceLock::new();
    MAKER.get_or_try_init(py, || Maker::of(message_attributes_class(py)?, ATTRIBUTE_FIELDS))
}

fn message_maker(py: Python<'_>) -> PyResult<&Maker<3>> {
    static MAKER: PyOnceLock<Maker<3>> = PyOnceLock::new();
    MAKER.get_or_try_init(py, || Maker::of(queue_message_class(py)?, MESSAGE_FIELDS))
}

/// Builds `QueueMessage`s without their `MessageAttributes` (see [`PyAttributesSlot`]): id,
/// payload and the instant of the batch, each into its slot. None when the class is not laid
/// out for that (its `attributes` not read through a [`PyAttributesSlot`], or a field not a
/// slot): messages are then built whole.
fn lazy_message_maker(py: Python<'_>) -> PyResult<Option<&Maker<3>>> {
    static MAKER: PyOnceLock<Option<Maker<3>>> = PyOnceLock::new();
    let maker = MAKER.get_or_try_init(py, || -> PyResult<_> {
        let class = queue_message_class(py)?;
        let lazy = class
            .getattr(intern!(py, "__dict__"))?
            .get_item("attributes")?
            .is_instance_of::<PyAttributesSlot>();
        let maker = Maker::of(class, ["id", "payload", "_enqueued_at"])?;
        Ok((lazy && matches!(maker.how, How::Slots(_))).then_some(maker))
    })?;
    Ok(maker.as_ref())
}

// ----- attributes built on first read ----------------------------------------------------------

/// The `attributes` field of `QueueMessage`, set over the field's slot by `types.py`: reads,
/// sets and deletes that slot. A batch enqueue leaves the slot of each message it returns empty
/// and the batch's instant in the message's `_enqueued_at` slot: the first read of `attributes`
/// builds the `MessageAttributes` an eager build would have made (the message's id, no receipt
/// handle, that instant, not received) and keeps them in the slot, so every read gives that
/// same object. A batch of a million messages then allocates, and frees, a million objects
/// fewer when the attributes are never read.
#[pyclass(module = "llm_queue_dispatcher._core", name = "AttributesSlot", frozen)]
pub struct PyAttributesSlot {
    /// The member descriptor of the `attributes` slot.
    slot: Py<PyAny>,
    /// The member descriptor of the `_enqueued_at` slot.
    enqueued_at: Py<PyAny>,
    /// The class declaring both slots (its address), and their offsets: a read of a built
    /// message's attributes is one load, no call.
    owner: usize,
    offsets: (usize, usize),
}

#[pymethods]
impl PyAttributesSlot {
    #[new]
    fn new(slot: &Bound<'_, PyAny>, enqueued_at: &Bound<'_, PyAny>) -> PyResult<Self> {
        match (object_slot(slot), object_slot(enqueued_at)) {
            (Some((owner, at)), Some((other, pending))) if owner == other => Ok(Self {
                slot: slot.clone().unbind(),
                enqueued_at: enqueued_at.clone().unbind(),
                owner,
                offsets: (at, pending),
            }),
            _ => Err(PyTypeError::new_err(format!(
                "AttributesSlot takes the member descriptors of two object slots of one class, got {} and {}",
                repr_of(slot),
                repr_of(enqueued_at)
            ))),
        }
    }

    fn __get__<'py>(
        slf: &Bound<'py, Self>,
        instance: Option<&Bound<'py, PyAny>>,
        _owner: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let Some(message) = instance.filter(|m| !m.is_none()) else { return Ok(slf.clone().into_any()) };
        let this = slf.get();
        // SAFETY: `owner` is the live class that declared the slots (the descriptors keep it).
        let fits =
            unsafe { ffi::PyObject_TypeCheck(message.as_ptr(), this.owner as *mut ffi::PyTypeObject) } != 0;
        if !fits {
            return descriptor_get(this.slot.bind(py), message); // its TypeError
        }
        let (at, pending) = this.offsets;
        // SAFETY: `message` is an instance of the class (or a subclass) whose object slots these are.
        let (attributes, enqueued_at) = unsafe { (*slot_at(message, at), *slot_at(message, pending)) };
        if !attributes.is_null() {
            // SAFETY: a live object the slot holds a reference to.
            return Ok(unsafe { Bound::from_borrowed_ptr(py, attributes) });
        }
        if enqueued_at.is_null() {
            return descriptor_get(this.slot.bind(py), message); // its AttributeError
        }
        // SAFETY: as above; a new reference while the slot's is given up below.
        let enqueued_at = unsafe { Bound::from_borrowed_ptr(py, enqueued_at) };
        let id = message.getattr(intern!(py, "id"))?;
        let (never, none) = (0u32.into_pyobject(py)?.into_any(), py.None().into_bound(py));
        let attributes =
            attributes_maker(py)?.make(py, [&id, intern!(py, "").as_any(), &enqueued_at, &never, &none])?;
        untrack_atomic(&attributes);
        // Set through the descriptors: whatever a finalizer run by a collection during the
        // build may have put in the slots is released, not leaked.
        descriptor_set(this.slot.bind(py), message, Some(&attributes))?;
        descriptor_set(this.enqueued_at.bind(py), message, None)?;
        Ok(attributes)
    }

    fn __set__(&self, py: Python<'_>, instance: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        descriptor_set(self.slot.bind(py), instance, Some(value))?;
        // A set value replaces attributes not built yet: they are never built.
        match descriptor_set(self.enqueued_at.bind(py), instance, None) {
            Err(error) if !error.is_instance_of::<PyAttributeError>(py) => Err(error),
            _ => Ok(()),
        }
    }

    fn __delete__(&self, py: Python<'_>, instance: &Bound<'_, PyAny>) -> PyResult<()> {
        let deleted = descriptor_set(self.slot.bind(py), instance, None);
        let pending = descriptor_set(self.enqueued_at.bind(py), instance, None);
        // Attributes not built yet count as set: deleting them succeeds once.
        match (deleted, pending) {
            (Ok(()), _) | (_, Ok(())) => Ok(()),
            (Err(error), _) => Err(error),
        }
    }
}

/// `descriptor.__get__(instance)` through the descriptor's slot.
fn descriptor_get<'py>(
    descriptor: &Bound<'py, PyAny>,
    instance: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = descriptor.py();
    // SAFETY: a member descriptor (checked at construction) has `tp_descr_get`; all pointers are
    // live; the slot returns a new reference or NULL with an exception set.
    unsafe {
        let get = (*ffi::Py_TYPE(descriptor.as_ptr())).tp_descr_get.ok_or_else(|| PyErr::fetch(py))?;
        let owner = ffi::Py_TYPE(instance.as_ptr()).cast::<ffi::PyObject>();
        Bound::from_owned_ptr_or_err(py, get(descriptor.as_ptr(), instance.as_ptr(), owner))
    }
}

/// `descriptor.__set__(instance, value)`, or `__delete__` for None, through the descriptor's slot.
fn descriptor_set(
    descriptor: &Bound<'_, PyAny>,
    instance: &Bound<'_, PyAny>,
    value: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let py = descriptor.py();
    // SAFETY: a member descriptor (checked at construction) has `tp_descr_set`; all pointers are
    // live (NULL deletes); it returns 0, or -1 with an exception set.
    let status = unsafe {
        let set = (*ffi::Py_TYPE(descriptor.as_ptr())).tp_descr_set.ok_or_else(|| PyErr::fetch(py))?;
        set(descriptor.as_ptr(), instance.as_ptr(), value.map_or(std::ptr::null_mut(), Bound::as_ptr))
    };
    if status < 0 {
        Err(PyErr::fetch(py))
    } else {
        Ok(())
    }
}

/// `object.__new__(cls)`: an instance whose `__init__` has not run. Calls `object`'s `tp_new`
/// slot directly, as `object.__new__` does after its checks (`cls` is one of the dataclasses
/// above, a plain subclass of `object`), without a Python-level call and its argument tuple.
fn new_instance<'py>(cls: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyAny>> {
    static OBJECT_NEW: OnceLock<usize> = OnceLock::new();
    let py = cls.py();
    let slot = *OBJECT_NEW.get_or_init(|| {
        // SAFETY: `PyBaseObject_Type` is the static type `object`; reading a slot is allowed.
        unsafe {
            ffi::PyType_GetSlot(std::ptr::addr_of_mut!(ffi::PyBaseObject_Type), ffi::Py_tp_new) as usize
        }
    });
    if slot == 0 {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: the slot holds `object`'s `newfunc`; it is called with a type, an empty tuple of
    // arguments and no keywords, as `object.__new__(cls)` calls it.
    unsafe {
        let new: ffi::newfunc = std::mem::transmute::<usize, ffi::newfunc>(slot);
        let args = PyTuple::empty(py);
        Bound::from_owned_ptr_or_err(py, new(cls.as_type_ptr(), args.as_ptr(), std::ptr::null_mut()))
    }
}

/// `object.__setattr__(obj, name, value)`: bypasses a frozen dataclass's `__setattr__`.
fn set_field<T>(obj: &Bound<'_, PyAny>, name: &Bound<'_, PyString>, value: &Bound<'_, T>) -> PyResult<()> {
    // SAFETY: all three pointers are live, owned by the Bound references for the call.
    let status = unsafe { ffi::PyObject_GenericSetAttr(obj.as_ptr(), name.as_ptr(), value.as_ptr()) };
    if status < 0 {
        Err(PyErr::fetch(obj.py()))
    } else {
        Ok(())
    }
}

// ----- datetimes -----------------------------------------------------------------------------

/// A timezone-aware UTC datetime for a clock reading in seconds since the epoch, rounded to the
/// microsecond.
pub(crate) fn utc_datetime(py: Python<'_>, seconds: f64) -> PyResult<Bound<'_, PyDateTime>> {
    const MICROS_PER_DAY: i64 = 86_400_000_000;
    let micros = (seconds * 1e6).round();
    // Years 1..=9999 are about ±2.5e17 µs around the epoch; datetime refuses the rest anyway.
    if !micros.is_finite() || micros.abs() > 4e17 {
        return Err(to_py_err(
            py,
            CoreError::InvalidRequest(format!("clock reading {seconds:?} is not a datetime")),
        ));
    }
    let micros = micros as i64;
    let (year, month, day) = civil_from_days(micros.div_euclid(MICROS_PER_DAY));
    let rest = micros.rem_euclid(MICROS_PER_DAY);
    let second_of_day = rest / 1_000_000;
    let utc = PyTzInfo::utc(py)?;
    PyDateTime::new(
        py,
        year as i32,
        month,
        day,
        (second_of_day / 3600) as u8,
        (second_of_day / 60 % 60) as u8,
        (second_of_day % 60) as u8,
        (rest % 1_000_000) as u32,
        Some(&utc),
    )
}

/// Messages built in one call often share instants (a batch's `enqueued_at`): reuse the object.
#[derive(Default)]
pub(crate) struct DateCache<'py> {
    last: Option<(u64, Bound<'py, PyDateTime>)>,
}

impl<'py> DateCache<'py> {
    pub(crate) fn get(&mut self, py: Python<'py>, seconds: f64) -> PyResult<Bound<'py, PyDateTime>> {
        match &self.last {
            Some((bits, date)) if *bits == seconds.to_bits() => Ok(date.clone()),
            _ => {
                let date = utc_datetime(py, seconds)?;
                self.last = Some((seconds.to_bits(), date.clone()));
                Ok(date)
            }
        }
    }
}

// ----- messages ------------------------------------------------------------------------------

/// What building a `QueueMessage` needs, copied out of the store under its lock.
pub(crate) struct MessageView {
    /// The `LLMRequest`.
    pub payload: Py<PyAny>,
    pub message_id: u64,
    pub enqueued_at: f64,
    pub receive_count: u32,
    pub first_received_at: Option<f64>,
    /// None for messages not received by this call (enqueue, peek): `receipt_handle` is "".
    pub handle: Option<ReceiptHandle>,
}

impl MessageView {
    /// Copies a stored message (one new reference to its payload).
    pub fn of(py: Python<'_>, message: &StoredMessage<Payload>, handle: Option<ReceiptHandle>) -> Self {
        Self {
            payload: message.payload.object.clone_ref(py),
            message_id: message.message_id,
            enqueued_at: message.enqueued_at,
            receive_count: message.receive_count,
            first_received_at: message.first_received_at(),
            handle,
        }
    }
}

fn build_from_parts<'py>(
    py: Python<'py>,
    view: &MessageView,
    handle: Bound<'py, PyString>,
    dates: &mut DateCache<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut id_buf = [0u8; MESSAGE_ID_LEN];
    let id = PyString::new(py, format_message_id_into(view.message_id, &mut id_buf)).into_any();
    let enqueued_at = dates.get(py, view.enqueued_at)?.into_any();
    let receive_count = view.receive_count.into_pyobject(py)?.into_any();
    let first_received_at = match view.first_received_at {
        Some(at) => dates.get(py, at)?.into_any(),
        None => py.None().into_bound(py),
    };
    let attributes = attributes_maker(py)?
        .make(py, [&id, handle.as_any(), &enqueued_at, &receive_count, &first_received_at])?;
    untrack_atomic(&attributes);
    message_maker(py)?.make(py, [&id, view.payload.bind(py), &attributes])
}

pub(crate) fn build_view<'py>(
    py: Python<'py>,
    view: &MessageView,
    dates: &mut DateCache<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    let handle = match &view.handle {
        Some(h) => PyString::new(py, h.encode_into(&mut [0u8; ReceiptHandle::LEN])),
        None => intern!(py, "").clone(),
    };
    build_from_parts(py, view, handle, dates)
}

pub(crate) fn build_list<'py>(py: Python<'py>, views: &[MessageView]) -> PyResult<Bound<'py, PyList>> {
    let _paused = GcPause::new();
    let mut dates = DateCache::default();
    let items = views.iter().map(|v| build_view(py, v, &mut dates)).collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// The `QueueMessage`s of a batch just enqueued: one per request, in order, with the message
/// ids `first_id`, `first_id + 1`, ..., all enqueued at `enqueued_at`, none received yet (what
/// [`build_view`] would build from each stored message, without reading them back).
pub(crate) fn build_enqueued<'py>(
    py: Python<'py>,
    requests: &[Bound<'py, PyAny>],
    first_id: u64,
    enqueued_at: f64,
) -> PyResult<Bound<'py, PyList>> {
    let _paused = GcPause::new();
    let enqueued_at = utc_datetime(py, enqueued_at)?;
    let (no_handle, none) = (intern!(py, ""), py.None().into_bound(py));
    let never = 0u32.into_pyobject(py)?.into_any();
    let (no_handle, none, enqueued_at) = (no_handle.as_any(), none.as_any(), enqueued_at.as_any());
    let (message_maker, attributes_maker) = (message_maker(py)?, attributes_maker(py)?);
    let lazy = lazy_message_maker(py)?;
    let len = isize::try_from(requests.len()).map_err(|_| PyErr::fetch(py))?;
    // SAFETY: a new list of `len` empty items, each set once below (a list dropped before
    // every item is set releases only those set).
    let list =
        unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyList_New(len))?.cast_into_unchecked::<PyList>() };
    let mut id_buf = [0u8; MESSAGE_ID_LEN];
    // Consecutive ids differ in their last 12 hex digits only (while `id >> 48` stays).
    let last_id = first_id.saturating_add(requests.len() as u64);
    let tail_only = first_id >> 48 == last_id >> 48;
    format_message_id_into(first_id, &mut id_buf);
    for ((i, request), message_id) in (0..len).zip(requests).zip(first_id..) {
        if tail_only {
            format_message_id_tail(message_id, &mut id_buf);
        } else {
            format_message_id_into(message_id, &mut id_buf);
        }
        let id = ascii_string(py, &id_buf)?.into_any();
        let message = if let Some(lazy) = lazy {
            lazy.make(py, [&id, request, enqueued_at])?
        } else {
            let attributes = attributes_maker.make(py, [&id, no_handle, enqueued_at, &never, none])?;
            untrack_atomic(&attributes);
            message_maker.make(py, [&id, request, &attributes])?
        };
        // SAFETY: `i < len`; the list takes the reference.
        unsafe { ffi::PyList_SET_ITEM(list.as_ptr(), i, message.into_ptr()) };
    }
    Ok(list)
}

/// Takes a `MessageAttributes` out of the cyclic garbage collector's sight, as `CPython` does
/// with a tuple or dict that holds only atomic values: its fields are strs, a datetime, an int
/// and None, so it can never be part of a reference cycle, and a collection need not visit it
/// (a batch of a million messages would otherwise leave the next collection a million more
/// objects to walk). It is freed by reference counting as before.
fn untrack_atomic(attributes: &Bound<'_, PyAny>) {
    // SAFETY: a live object of a GC-tracked class; untracking is allowed at any time, and its
    // deallocator untracks only what is still tracked.
    unsafe { ffi::PyObject_GC_UnTrack(attributes.as_ptr().cast()) };
}

/// [`MESSAGE_ID_LEN`] as `CPython`'s size type.
const ID_LEN: isize = 36;
const _: () = assert!(ID_LEN.unsigned_abs() == MESSAGE_ID_LEN);

/// A str of ASCII bytes, copied straight into a new compact string (no UTF-8 decoding).
fn ascii_string<'py>(py: Python<'py>, text: &[u8; MESSAGE_ID_LEN]) -> PyResult<Bound<'py, PyString>> {
    debug_assert!(text.is_ascii());
    // SAFETY: `PyUnicode_New` with a maximum character below 128 makes a compact ASCII string
    // of exactly `MESSAGE_ID_LEN` one-byte characters, which are all written before it is used.
    unsafe {
        let string = Bound::from_owned_ptr_or_err(py, ffi::PyUnicode_New(ID_LEN, 127))?;
        std::ptr::copy_nonoverlapping(
            text.as_ptr(),
            ffi::PyUnicode_1BYTE_DATA(string.as_ptr()),
            MESSAGE_ID_LEN,
        );
        Ok(string.cast_into_unchecked())
    }
}

/// Pauses `CPython`'s cyclic garbage collector while a batch of messages is built. Every object
/// built is reachable from the list returned, so a collection in between can free nothing, but
/// the allocations would trigger collections that scan every object of the process, which made
/// large batches several times slower. Pauses nest and overlap across threads: the first one
/// records whether the collector was enabled, the last one to end restores that.
struct GcPause;

/// `(pauses in progress, whether the collector was enabled before the first)`.
static GC_PAUSES: Mutex<(usize, bool)> = Mutex::new((0, false));

impl GcPause {
    fn new() -> Self {
        let mut pauses = GC_PAUSES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pauses.0 == 0 {
            // SAFETY: the caller is attached to the interpreter; this only flips a flag.
            pauses.1 = unsafe { ffi::PyGC_Disable() } != 0;
        }
        pauses.0 += 1;
        Self
    }
}

impl Drop for GcPause {
    fn drop(&mut self) {
        let mut pauses = GC_PAUSES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pauses.0 -= 1;
        if pauses.0 == 0 && pauses.1 {
            // SAFETY: as in `new`; the guard lives inside a call attached to the interpreter.
            unsafe { ffi::PyGC_Enable() };
        }
    }
}

/// Builds the `QueueMessage` of a view copied under the lock (selection builds its messages
/// with this after unlocking: constructing objects may run the garbage collector, and with it
/// arbitrary finalizers that might call back into the store).
pub(crate) fn build_view_message(py: Python<'_>, view: &MessageView) -> PyResult<Py<PyAny>> {
    Ok(build_view(py, view, &mut DateCache::default())?.unbind())
}
