using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.LibVmm;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu.Tests;

/// <summary><see cref="ExitHandler.Decide"/> as a pure function: no thread, no actor.</summary>
public sealed class ExitHandlerTests
{
    private static readonly DeviceRoute Uart = new("uart", ActorRefs.Nobody);
    private static readonly DeviceRoute Hpet = new("hpet", ActorRefs.Nobody);
    private static readonly AddressBus<DeviceRoute> Ports = AddressBus<DeviceRoute>.Empty.Insert(Uart, 0x3F8, 8);
    private static readonly AddressBus<DeviceRoute> Mmio = AddressBus<DeviceRoute>.Empty.Insert(Hpet, 0xFED0_0000, 0x400);

    private static ExitAction Decide(VmExit exit) => ExitHandler.Decide(exit, Ports, Mmio);

    [Fact]
    public void Decide_must_resolve_a_port_write_to_the_device_offset()
    {
        var action = Decide(new VmExit.Io(true, 0x3FB, 1, 1, 0x83, null));

        Assert.Equal(new ExitAction(ExitActionKind.PostWrite, Uart, 3, 1, Space: DeviceProtocol.Space.Port), action);
    }

    [Fact]
    public void Decide_must_resolve_a_port_read_to_the_device_offset()
    {
        var action = Decide(new VmExit.Io(false, 0x3FF, 2, 1, 0, null));

        Assert.Equal(ExitActionKind.Read, action.Kind);
        Assert.Same(Uart, action.Route);
        Assert.Equal(7UL, action.Offset);
        Assert.Equal(2, action.Size);
    }

    [Fact]
    public void Decide_must_resolve_mmio_reads_and_writes()
    {
        var read = Decide(new VmExit.Mmio(0xFED0_00F0, false, 8, 0));
        var write = Decide(new VmExit.Mmio(0xFED0_0010, true, 4, 1));

        Assert.Equal(new ExitAction(ExitActionKind.Read, Hpet, 0xF0, 8, Space: DeviceProtocol.Space.Mmio), read);
        Assert.Equal(new ExitAction(ExitActionKind.PostWrite, Hpet, 0x10, 4, Space: DeviceProtocol.Space.Mmio), write);
    }

    [Theory]
    [InlineData(0x3F7)] // just below the UART
    [InlineData(0x400)] // just past it
    public void Decide_must_mark_accesses_outside_every_port_range_unassigned(int port)
    {
        Assert.Equal(new ExitAction(ExitActionKind.UnassignedRead, Size: 1), Decide(new VmExit.Io(false, (ushort)port, 1, 1, 0, null)));
        Assert.Equal(new ExitAction(ExitActionKind.UnassignedWrite, Size: 2), Decide(new VmExit.Io(true, (ushort)port, 2, 1, 0, null)));
    }

    [Fact]
    public void Decide_must_mark_unmapped_mmio_unassigned()
    {
        var read = Decide(new VmExit.Mmio(0xFED0_0400, false, 4, 0));
        var write = Decide(new VmExit.Mmio(0xFEBF_FFFF, true, 1, 0));

        Assert.Equal(new ExitAction(ExitActionKind.UnassignedRead, Size: 4, Space: DeviceProtocol.Space.Mmio), read);
        Assert.Equal(new ExitAction(ExitActionKind.UnassignedWrite, Size: 1, Space: DeviceProtocol.Space.Mmio), write);
    }

    [Fact]
    public void Decide_must_halt_on_hlt_and_reenter_on_intr_and_irq_window()
    {
        Assert.Equal(ExitActionKind.Halt, Decide(VmExit.Hlt.Instance).Kind);
        Assert.Equal(ExitActionKind.Reenter, Decide(VmExit.Intr.Instance).Kind);
        Assert.Equal(ExitActionKind.Reenter, Decide(VmExit.IrqWindowOpen.Instance).Kind);
    }

    [Fact]
    public void Decide_must_fault_msr_exits()
    {
        Assert.Equal(ExitActionKind.MsrFault, Decide(new VmExit.MsrRead(0x10, 0)).Kind);
        Assert.Equal(ExitActionKind.MsrFault, Decide(new VmExit.MsrWrite(0x10, 1, 0)).Kind);
    }

    [Fact]
    public void Decide_must_stop_on_fatal_exits_with_their_reason()
    {
        Assert.Equal(new ExitAction(ExitActionKind.Stop, StopReason: StopReason.TripleFault), Decide(VmExit.Shutdown.Instance));
        Assert.Equal(new ExitAction(ExitActionKind.Stop, StopReason: StopReason.InternalError),
            Decide(new VmExit.InternalError(VmExit.InternalError.EmulationFailure, [])));
        Assert.Equal(StopReason.FailEntry, Decide(new VmExit.FailEntry(0x21, 0)).StopReason);
        Assert.Equal(StopReason.SystemEvent, Decide(new VmExit.SystemEvent(VmExit.SystemEvent.ResetType, [])).StopReason);
        Assert.Equal(StopReason.UnhandledExit, Decide(new VmExit.Unknown(99)).StopReason);
    }

    [Theory]
    [InlineData(1, 0xFFUL)]
    [InlineData(2, 0xFFFFUL)]
    [InlineData(4, 0xFFFF_FFFFUL)]
    [InlineData(8, ulong.MaxValue)]
    public void AllOnes_must_fill_the_access_size(int size, ulong expected) =>
        Assert.Equal(expected, AccessSize.AllOnes(size));
}

public sealed class FailureReportTests
{
    // 0F C7 /1 is CMPXCHG8B; only REX.W makes it CMPXCHG16B (Intel SDM Vol 2A, CMPXCHG8B/CMPXCHG16B).
    [Fact]
    public void Disassemble_must_decode_cmpxchg16b_in_64_bit_mode() =>
        Assert.Equal("cmpxchg16b [rsi]", FailureReport.Disassemble([0x48, 0x0F, 0xC7, 0x0E], 0x1000, 64));

    [Fact]
    public void Disassemble_must_decode_cmpxchg8b_without_rex_w() =>
        Assert.Equal("cmpxchg8b [rsi]", FailureReport.Disassemble([0x0F, 0xC7, 0x0E], 0x1000, 64));

    [Fact]
    public void Disassemble_must_decode_hlt() =>
        Assert.Equal("hlt", FailureReport.Disassemble([0xF4], 0x7C00, 16));

    [Fact]
    public void Disassemble_must_say_when_the_bytes_are_no_instruction() =>
        Assert.Equal("(invalid instruction)", FailureReport.Disassemble([0x0F, 0xFF], 0, 64));

    [Fact]
    public void Describe_must_name_the_internal_error_and_its_data() =>
        Assert.Equal("KVM internal error: emulation failure (suberror 1), data [0x2 0xF]",
            FailureReport.Describe(StopReason.InternalError, new VmExit.InternalError(1, [0x2, 0xF])));
}
