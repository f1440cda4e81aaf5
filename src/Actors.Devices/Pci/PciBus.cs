namespace ActorVmm.Devices.Pci;

/// <summary>A BAR of function <see cref="Device"/>.<see cref="Function"/> on bus 0 started or stopped
/// decoding, or moved: <see cref="OldAddress"/> is where it decoded before (null: nowhere),
/// <see cref="NewAddress"/> where it decodes now (null: nowhere). I/O BARs are port addresses,
/// memory BARs guest-physical addresses; the range is <see cref="Size"/> bytes.</summary>
public sealed record PciBarChange(int Device, int Function, int Bar, PciBarKind Kind, ulong Size, ulong? OldAddress, ulong? NewAddress);

/// <summary>Told of every BAR change, synchronously from the configuration write that made it, so
/// the VM can route (or stop routing) the BAR's range to the device's actor before the guest's next
/// access. Must not block.</summary>
public interface IPciBarListener
{
    void BarChanged(PciBarChange change);
}

/// <summary>
/// Bus 0 of the PCI hierarchy as configuration space sees it: up to 32 devices of up to 8
/// functions, each a <see cref="PciConfigSpace"/>. A configuration read of an absent function
/// returns all ones (PCI Local Bus 3.0 §6.1: the master abort of a read returns FFFFh in the
/// vendor ID, which software takes as "no function"); a write to one is dropped. After each write
/// the bus compares where the function's BARs decode with where they decoded before and tells the
/// <see cref="IPciBarListener"/> of each difference. Pure: no actors.
/// </summary>
public sealed class PciBus
{
    public const int Devices = 32;
    public const int FunctionsPerDevice = 8;

    private readonly PciConfigSpace?[] _functions = new PciConfigSpace?[Devices * FunctionsPerDevice];
    private readonly ulong?[][] _decoded = new ulong?[Devices * FunctionsPerDevice][];
    private IPciBarListener? _listener;

    /// <summary>Where BAR changes go (null: nowhere). Set by the VM before the guest runs.</summary>
    public IPciBarListener? Listener
    {
        get => _listener;
        set => _listener = value;
    }

    /// <summary>
    /// Places <paramref name="config"/> at <paramref name="device"/>.<paramref name="function"/>. As a
    /// PC BIOS does, its Interrupt Line register is set to the GSI its pin is routed to
    /// (<see cref="PciInterruptRouting.Gsi"/>); a function other than 0 sets the multi-function bit
    /// in function 0's header type (§6.2.1), which must be placed first. Throws on a taken slot or
    /// a bad number (a wiring error, never a guest's).
    /// </summary>
    public PciConfigSpace Attach(int device, int function, PciConfigSpace config)
    {
        if (device is < 0 or >= Devices || function is < 0 or >= FunctionsPerDevice)
            throw new ArgumentOutOfRangeException(nameof(device), $"{device}.{function} is not a bus-0 function");
        var slot = device * FunctionsPerDevice + function;
        if (_functions[slot] is not null) throw new InvalidOperationException($"00:{device:x2}.{function} is taken");
        if (function != 0)
        {
            if (_functions[device * FunctionsPerDevice] is not { } f0)
                throw new InvalidOperationException($"00:{device:x2}.0 must exist before function {function}");
            f0.SetMultiFunction();
        }
        if (PciInterruptRouting.Gsi(device, config.Pin) is { } gsi) config.Set(PciConfigSpace.InterruptLineOffset, 1, gsi);
        _functions[slot] = config;
        _decoded[slot] = new ulong?[PciConfigSpace.BarCount];
        return config;
    }

    public PciConfigSpace? Function(int device, int function) =>
        device is >= 0 and < Devices && function is >= 0 and < FunctionsPerDevice ? _functions[device * FunctionsPerDevice + function] : null;

    /// <summary>A configuration read of 1-4 bytes at <paramref name="offset"/> (0-4095) of a bus-0 function.</summary>
    public uint Read(int device, int function, int offset, int size) =>
        Function(device, function) is { } config ? config.Read(offset, size) : (uint)AccessSize.AllOnes(Math.Clamp(size, 0, 4));

    /// <summary>A configuration write; BAR changes it causes go to the listener.</summary>
    public void Write(int device, int function, int offset, int size, uint value)
    {
        if (Function(device, function) is not { } config) return;
        config.Write(offset, size, value);
        Resync(device, function);
    }

    /// <summary>Tells the listener of every BAR whose decoding differs from what it last heard (after a
    /// restore, call it for every function, or use <see cref="ResyncAll"/>).</summary>
    public void Resync(int device, int function)
    {
        var slot = device * FunctionsPerDevice + function;
        if (_functions[slot] is not { } config) return;
        var decoded = _decoded[slot];
        for (var i = 0; i < PciConfigSpace.BarCount; i++)
        {
            if (config.Bar(i) is not { } bar || bar.Index != i) continue;
            var now = config.DecodedAddress(i);
            if (now == decoded[i]) continue;
            var before = decoded[i];
            decoded[i] = now;
            _listener?.BarChanged(new PciBarChange(device, function, i, bar.Kind, bar.Size, before, now));
        }
    }

    public void ResyncAll()
    {
        for (var d = 0; d < Devices; d++)
            for (var f = 0; f < FunctionsPerDevice; f++)
                Resync(d, f);
    }
}
