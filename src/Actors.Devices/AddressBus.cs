namespace ActorVmm.Devices;

/// <summary>An error in wiring a bus: an overlap, an empty range or a range past the end.</summary>
public sealed class BusException(string message) : ActorVmm.LibVmm.VmmException(message);

/// <summary>
/// A sorted set of non-overlapping ranges (base, length) each owned by one device. Used for the
/// port-I/O bus (16-bit space) and the MMIO bus (64-bit guest physical space). Immutable after
/// build: lookups run on the vcpu thread on every exit, so they are a binary search over arrays.
/// </summary>
public sealed class AddressBus<T>
{
    private readonly ulong[] _bases;
    private readonly ulong[] _ends; // exclusive
    private readonly T[] _devices;

    private AddressBus(ulong[] bases, ulong[] ends, T[] devices)
    {
        _bases = bases;
        _ends = ends;
        _devices = devices;
    }

    public static AddressBus<T> Empty { get; } = new([], [], []);

    public int Count => _devices.Length;

    public IEnumerable<(ulong Base, ulong Length, T Device)> Entries
    {
        get
        {
            for (var i = 0; i < _devices.Length; i++)
                yield return (_bases[i], _ends[i] - _bases[i], _devices[i]);
        }
    }

    /// <summary>Returns a new bus with the device added. Throws <see cref="BusException"/> on overlap.</summary>
    public AddressBus<T> Insert(T device, ulong @base, ulong length)
    {
        if (length == 0) throw new BusException($"empty range at 0x{@base:X}");
        if (@base + length < @base) throw new BusException($"range at 0x{@base:X} length 0x{length:X} wraps");
        var end = @base + length;
        var i = LowerBound(@base);
        if (i > 0 && _ends[i - 1] > @base)
            throw new BusException($"{device} at 0x{@base:X}-0x{end - 1:X} overlaps {_devices[i - 1]} at 0x{_bases[i - 1]:X}-0x{_ends[i - 1] - 1:X}");
        if (i < _bases.Length && _bases[i] < end)
            throw new BusException($"{device} at 0x{@base:X}-0x{end - 1:X} overlaps {_devices[i]} at 0x{_bases[i]:X}-0x{_ends[i] - 1:X}");
        return new AddressBus<T>(InsertAt(_bases, i, @base), InsertAt(_ends, i, end), InsertAt(_devices, i, device));
    }

    /// <summary>Returns a new bus without the range that starts at <paramref name="base"/> (the same bus
    /// if no range starts there).</summary>
    public AddressBus<T> Remove(ulong @base)
    {
        var i = LowerBound(@base);
        if (i >= _bases.Length || _bases[i] != @base) return this;
        return new AddressBus<T>(RemoveAt(_bases, i), RemoveAt(_ends, i), RemoveAt(_devices, i));
    }

    /// <summary>Finds the device owning <paramref name="address"/>; the offset is relative to its base.</summary>
    public bool TryResolve(ulong address, out T device, out ulong offset)
    {
        // Last range whose base <= address.
        int lo = 0, hi = _bases.Length - 1;
        while (lo <= hi)
        {
            var mid = (lo + hi) >>> 1;
            if (_bases[mid] <= address) lo = mid + 1;
            else hi = mid - 1;
        }
        if (hi >= 0 && address < _ends[hi])
        {
            device = _devices[hi];
            offset = address - _bases[hi];
            return true;
        }
        device = default!;
        offset = 0;
        return false;
    }

    private int LowerBound(ulong value)
    {
        int lo = 0, hi = _bases.Length;
        while (lo < hi)
        {
            var mid = (lo + hi) >>> 1;
            if (_bases[mid] < value) lo = mid + 1;
            else hi = mid;
        }
        return lo;
    }

    private static TItem[] RemoveAt<TItem>(TItem[] source, int index) => [.. source[..index], .. source[(index + 1)..]];

    private static TItem[] InsertAt<TItem>(TItem[] source, int index, TItem item)
    {
        var result = new TItem[source.Length + 1];
        Array.Copy(source, 0, result, 0, index);
        result[index] = item;
        Array.Copy(source, index, result, index + 1, source.Length - index);
        return result;
    }
}
