//! The arrays `Loader.submit` writes into, checked before a worker thread gets
//! their address.
//!
//! PyO3's `PyBuffer` needs the buffer protocol in the stable ABI, which Python
//! added in 3.11, and this module is built for abi3 3.10. So arrays come through
//! NumPy's array interface (`__array_interface__`), which states the same facts:
//! address, element type, shape, strides and whether the memory is read-only. A
//! CPU torch tensor's `.numpy()` view, pinned or not, provides it with no copy.
//!
//! Only objects whose type is exactly `numpy.ndarray` are read. Any other object
//! can state an arbitrary address (a class with a hand-written
//! `__array_interface__`, or an ndarray subclass overriding the property), and
//! holding such an object does not hold the memory it names. An exact ndarray's
//! interface is NumPy's own account of its data, and the array keeps that memory
//! alive: its own allocation, or its `base` (for `.numpy()`, the tensor, which
//! holds its storage).

use std::mem::{align_of, size_of};
use std::ops::Range;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyType};

/// An element type the loader writes, as NumPy names and encodes it.
pub trait Element {
    const NAME: &'static str;
    const TYPESTR: &'static str;
}

impl Element for i64 {
    const NAME: &'static str = "int64";
    const TYPESTR: &'static str = if cfg!(target_endian = "little") { "<i8" } else { ">i8" };
}

impl Element for i32 {
    const NAME: &'static str = "int32";
    const TYPESTR: &'static str = if cfg!(target_endian = "little") { "<i4" } else { ">i4" };
}

/// A writable, C-contiguous, aligned array of `len` values of `T` at `ptr`.
pub struct OutArray<T> {
    pub ptr: *mut T,
    pub len: usize,
}

impl<T> OutArray<T> {
    /// The bytes it covers, to tell arrays that share memory apart.
    pub fn bytes(&self) -> Range<usize> {
        let start = self.ptr as usize;
        start..start + self.len * size_of::<T>()
    }
}

/// `numpy.ndarray`, looked up once.
static NDARRAY: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// Reads `obj`'s array interface; `name` is the argument it was passed as, for errors.
/// `obj` must be a `numpy.ndarray` itself, not a subclass (see the module comment).
pub fn out_array<'py, T: Element>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<OutArray<T>> {
    let py = obj.py();
    let not_an_array = || {
        let kind = obj.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string());
        PyTypeError::new_err(format!(
            "{name}: expected a writable {} numpy.ndarray (not a subclass), such as a CPU tensor's .numpy() view; got {kind}",
            T::NAME
        ))
    };
    if !obj.is_exact_instance(NDARRAY.import(py, "numpy", "ndarray")?.as_any()) {
        return Err(not_an_array());
    }
    let iface = obj.getattr(intern!(py, "__array_interface__")).map_err(|_| not_an_array())?;
    let iface = iface.cast::<PyDict>().map_err(|_| not_an_array())?;
    let field = |key: &Bound<'py, PyString>| -> PyResult<Bound<'py, PyAny>> {
        iface.get_item(key)?.ok_or_else(|| PyTypeError::new_err(format!("{name}: its __array_interface__ has no {key}")))
    };

    let typestr = field(intern!(py, "typestr"))?;
    let typestr = typestr.cast::<PyString>().map_err(|_| not_an_array())?.to_str()?;
    if typestr != T::TYPESTR {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected {} elements (typestr '{}'), got typestr '{typestr}'",
            T::NAME,
            T::TYPESTR
        )));
    }
    let (address, readonly): (usize, bool) = field(intern!(py, "data"))?
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{name}: its __array_interface__ gives no (address, read-only) pair")))?;
    if readonly {
        return Err(PyValueError::new_err(format!("{name}: the array is read-only, and the loader writes into it")));
    }
    let shape: Vec<usize> = field(intern!(py, "shape"))?.extract()?;
    let strides: Option<Vec<isize>> = iface.get_item(intern!(py, "strides"))?.map(|s| s.extract()).transpose()?.flatten();
    let len = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| PyValueError::new_err(format!("{name}: shape {} overflows", py_tuple(&shape))))?;
    if let Some(strides) = &strides {
        if !is_c_contiguous(&shape, strides, size_of::<T>()) {
            return Err(PyValueError::new_err(format!(
                "{name}: the array is not C-contiguous (shape {}, strides {}); pass a contiguous one",
                py_tuple(&shape),
                py_tuple(strides)
            )));
        }
    }
    if len > 0 && (address == 0 || address % align_of::<T>() != 0) {
        return Err(PyValueError::new_err(format!("{name}: address {address:#x} is not aligned for {}", T::NAME)));
    }
    Ok(OutArray { ptr: address as *mut T, len })
}

/// Row-major with no gaps; a dimension of length 1 may have any stride, as in NumPy.
fn is_c_contiguous(shape: &[usize], strides: &[isize], item: usize) -> bool {
    if shape.len() != strides.len() {
        return false;
    }
    if shape.contains(&0) {
        return true;
    }
    let mut expected = item as isize;
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d as isize;
    }
    true
}

/// `values` as Python writes a tuple, as NumPy reports shapes and strides.
fn py_tuple<T: std::fmt::Display>(values: &[T]) -> String {
    match values {
        [one] => format!("({one},)"),
        _ => format!("({})", values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")),
    }
}
