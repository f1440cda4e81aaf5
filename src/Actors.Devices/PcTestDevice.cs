using System.Buffers.Binary;
using System.Collections.Immutable;

namespace ActorVmm.Devices;

/// <summary>Snapshot of a <see cref="PcTestDevice"/>: the scratch register and the MMIO RAM
/// (<see cref="PcTestDevice.IomemLength"/> bytes). Equality compares the RAM by content.</summary>
public sealed record PcTestDeviceState(uint Scratch, ImmutableArray<byte> Iomem)
{
    public bool Equals(PcTestDeviceState? other) =>
        other is not null && Scratch == other.Scratch && Iomem.AsSpan().SequenceEqual(other.Iomem.AsSpan());

    public override int GetHashCode() => HashCode.Combine(Scratch, Iomem.Length);
}

/// <summary>
/// QEMU's <c>pc-testdev</c> (hw/misc/pc-testdev.c): the device through which standard x86 KVM test
/// suites (kvm-unit-tests) drive interrupt lines, flush guest pages and run instruction emulation
/// on MMIO. One model, five bus windows (addresses in <see cref="Platform"/>):
/// <list type="bullet">
/// <item><see cref="ScratchWindow"/>, ports 0xE0-0xE3: a 32-bit scratch register, little endian
/// (byte n at port 0xE0 + n). An access of any size at any offset reads or writes the bytes it covers.</item>
/// <item><see cref="ByteScratchWindow"/>, ports 0xE8-0xEB: the same register, which QEMU serves one
/// byte at a time (a wider access is split into byte accesses, byte n at 0xE8 + n): the same bytes,
/// so the same results.</item>
/// <item><see cref="FlushWindow"/>, port 0xE4: a 4-byte write of a guest-physical address asks the
/// owner of guest memory to drop the hypervisor's mapping of the page holding it
/// (<see cref="IPlatformEvents.RequestPageFlush"/>), so the guest's next access to that page faults
/// in again (QEMU: mprotect PROT_NONE then read/write on its mapping, which makes KVM's MMU notifier
/// zap the page). Only the 32-bit write at 0xE4 does that (QEMU takes 4-byte accesses only); other
/// sizes and offsets are ignored.</item>
/// <item><see cref="IrqWindow"/>, ports 0x2000-0x2017: a byte written to 0x2000 + n drives
/// interrupt line n to (byte != 0): lines 0-15 are ISA IRQs, 16-23 IOAPIC pins (as the host wires
/// them). QEMU's region takes byte accesses only and splits a wider one into bytes at consecutive
/// ports, so a wider write drives consecutive lines, one per byte (the real-mode suite's
/// <c>outl</c> to 0x200B sets line 11 from its low byte and lines 12-14 from the others).</item>
/// <item><see cref="IomemWindow"/>, guest-physical 0xFF000000-0xFF00FFFF (QEMU's IOMEM_LEN): plain
/// memory behind MMIO exits, little endian, any access size. It must stay off every memslot: suites
/// test the instruction emulator on it.</item>
/// </list>
/// Bytes of an access that fall past its window belong to no register: written, they are dropped;
/// read, they are all ones (an unassigned port or address). The write-only windows (flush, lines)
/// read 0. Single-threaded (its actor calls it); reads allocate nothing.
/// </summary>
public sealed class PcTestDevice : IStatefulDevice
{
    public const ulong ScratchWindow = 0x000;
    public const ulong FlushWindow = 0x100;
    public const ulong ByteScratchWindow = 0x200;
    public const ulong IrqWindow = 0x300;
    public const ulong IomemWindow = 0x1_0000;

    public const int ScratchLength = 4;
    public const int FlushLength = 4;
    public const int Lines = Platform.TestDevIrqLines;
    public const int IomemLength = (int)Platform.TestDevIomemLength;

    /// <summary>The port windows are this wide; the offset within one is below it.</summary>
    private const ulong PortWindowMask = 0xFF;

    /// <summary>The flush port takes a 32-bit address; the page is the one holding it.</summary>
    private const ulong PageMask = ~0xFFFUL;

    private readonly IPlatformEvents _platform;
    private readonly IInterruptLine[] _lines;
    private readonly byte[] _iomem = new byte[IomemLength];
    private uint _scratch;

    /// <param name="lines">interrupt lines 0-23 (<see cref="Lines"/> of them), in order</param>
    /// <param name="platform">takes the flush port's page flushes</param>
    public PcTestDevice(IPlatformEvents platform, IReadOnlyList<IInterruptLine> lines)
    {
        if (lines.Count != Lines) throw new ArgumentException($"pc-testdev has {Lines} interrupt lines, not {lines.Count}", nameof(lines));
        _platform = platform;
        _lines = [.. lines];
    }

    /// <summary>What makes <paramref name="state"/> differ from any record <see cref="State"/> makes, or
    /// null: MMIO RAM that is not <see cref="IomemLength"/> bytes. (<see cref="FromState"/> itself takes
    /// a shorter RAM as zero-filled and cuts a longer one.)</summary>
    public static string? StateProblem(PcTestDeviceState state)
    {
        var length = state.Iomem.IsDefault ? 0 : state.Iomem.Length;
        return length != IomemLength ? $"MMIO RAM must have {IomemLength} bytes, not {length}" : null;
    }

    public static PcTestDevice FromState(PcTestDeviceState state, IPlatformEvents platform, IReadOnlyList<IInterruptLine> lines)
    {
        var device = new PcTestDevice(platform, lines) { _scratch = state.Scratch };
        state.Iomem.AsSpan()[..Math.Min(state.Iomem.Length, IomemLength)].CopyTo(device._iomem);
        return device;
    }

    public PcTestDeviceState State() => new(_scratch, ImmutableArray.Create(_iomem));

    object IStatefulDevice.SaveState() => State();

    /// <summary>Whether a write at <paramref name="offset"/> acts beyond the device (a line change, a
    /// page flush): the writer should wait for it, so that it has taken effect before the guest's
    /// next instruction, as on QEMU where the OUT completes only after it.</summary>
    public static bool ActsBeyondTheDevice(ulong offset) =>
        offset < IomemWindow && (offset & ~PortWindowMask) is FlushWindow or IrqWindow;

    public ulong Read(ulong offset, int size)
    {
        if (offset >= IomemWindow) return ReadIomem(offset - IomemWindow, size);
        var within = offset & PortWindowMask;
        return (offset & ~PortWindowMask) switch
        {
            ScratchWindow or ByteScratchWindow => ReadScratch(within, size),
            FlushWindow => within < FlushLength ? 0 : AccessSize.AllOnes(size),
            IrqWindow => within < Lines ? 0 : AccessSize.AllOnes(size),
            _ => AccessSize.AllOnes(size),
        };
    }

    public void Write(ulong offset, int size, ulong value)
    {
        if (offset >= IomemWindow)
        {
            WriteIomem(offset - IomemWindow, size, value);
            return;
        }
        var within = offset & PortWindowMask;
        switch (offset & ~PortWindowMask)
        {
            case ScratchWindow or ByteScratchWindow:
                WriteScratch(within, size, value);
                break;
            case FlushWindow:
                if (within == 0 && size == 4) _platform.RequestPageFlush(value & 0xFFFF_FFFF & PageMask);
                break;
            case IrqWindow:
                for (var i = 0; i < Bytes(size); i++)
                {
                    var line = within + (ulong)i;
                    if (line >= Lines) break;
                    if (((value >> (8 * i)) & 0xFF) != 0) _lines[line].Assert();
                    else _lines[line].Deassert();
                }
                break;
        }
    }

    /// <summary>The bytes an access of <paramref name="size"/> covers (a model may be handed any size).</summary>
    private static int Bytes(int size) => Math.Clamp(size, 0, 8);

    private ulong ReadScratch(ulong within, int size)
    {
        var result = 0UL;
        for (var i = 0; i < Bytes(size); i++)
        {
            var at = within + (ulong)i;
            var b = at < ScratchLength ? (_scratch >> (int)(8 * at)) & 0xFF : 0xFF;
            result |= (ulong)b << (8 * i);
        }
        return result;
    }

    private void WriteScratch(ulong within, int size, ulong value)
    {
        for (var i = 0; i < Bytes(size); i++)
        {
            var at = within + (ulong)i;
            if (at >= ScratchLength) break;
            var shift = (int)(8 * at);
            _scratch = (_scratch & ~(0xFFu << shift)) | (uint)(((value >> (8 * i)) & 0xFF) << shift);
        }
    }

    private ulong ReadIomem(ulong at, int size)
    {
        var n = Bytes(size);
        if (at <= (ulong)(IomemLength - n))
        {
            var bytes = _iomem.AsSpan((int)at, n);
            switch (n)
            {
                case 1: return bytes[0];
                case 2: return BinaryPrimitives.ReadUInt16LittleEndian(bytes);
                case 4: return BinaryPrimitives.ReadUInt32LittleEndian(bytes);
                case 8: return BinaryPrimitives.ReadUInt64LittleEndian(bytes);
            }
        }
        var result = 0UL;
        for (var i = 0; i < n; i++)
        {
            var b = InIomem(at, i) ? _iomem[at + (ulong)i] : 0xFFUL;
            result |= b << (8 * i);
        }
        return result;
    }

    private void WriteIomem(ulong at, int size, ulong value)
    {
        var n = Bytes(size);
        for (var i = 0; i < n && InIomem(at, i); i++)
            _iomem[at + (ulong)i] = (byte)(value >> (8 * i));
    }

    /// <summary>Byte <paramref name="i"/> of an access at <paramref name="at"/> is inside the RAM (no wrap-around).</summary>
    private static bool InIomem(ulong at, int i) => at < IomemLength && (ulong)i < IomemLength - at;
}
