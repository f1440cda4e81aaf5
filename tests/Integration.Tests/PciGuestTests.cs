using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>A real guest reaches the PCI bus's configuration space through mechanism #1 (ports
/// 0xCF8/0xCFC, PCI Local Bus 3.0 §3.2.2.3.2) and through ECAM (PCIe Base 4.0 §7.2.2): both show the
/// host bridge at 00:00.0 and the same registers.</summary>
public sealed class PciGuestTests
{
    private const ulong Code = 0x10_0000;

    /// <summary>Each failed check writes its own status to the debug-exit port; all passed: 0.</summary>
    [KvmFact]
    public async Task A_guest_reads_and_writes_the_host_bridge_through_both_configuration_mechanisms()
    {
        var a = new Assembler(64);
        var fail = a.CreateLabel();
        void Mechanism1Address(uint address)
        {
            a.mov(dx, Platform.PciConfigAddressPort);
            a.mov(eax, address);
            a.@out(dx, eax);
        }
        void Check(byte status)
        {
            a.mov(bl, status);
            a.jne(fail);
        }

        // 00:00.0 dword 0: device 0x0008, vendor 0x1B36.
        Mechanism1Address(0x8000_0000);
        a.mov(dx, Platform.PciConfigDataPort);
        a.@in(eax, dx);
        a.cmp(eax, 0x0008_1B36);
        Check(2);
        // Byte lane 3 of dword 8: the base class, 0x06 (bridge).
        Mechanism1Address(0x8000_0008);
        a.mov(dx, (ushort)(Platform.PciConfigDataPort + 3));
        a.@in(al, dx);
        a.cmp(al, 0x06);
        Check(3);
        // CONFIG_ADDRESS reads back what was latched.
        a.mov(dx, Platform.PciConfigAddressPort);
        a.@in(eax, dx);
        a.cmp(eax, unchecked((int)0x8000_0008));
        Check(4);
        // No device at 00:01.0: all ones.
        Mechanism1Address(0x8000_0800);
        a.mov(dx, Platform.PciConfigDataPort);
        a.@in(eax, dx);
        a.cmp(eax, -1);
        Check(5);
        // ECAM: the same dword 0.
        a.mov(rdi, (long)Platform.PciEcamBase);
        a.mov(eax, __dword_ptr[rdi]);
        a.cmp(eax, 0x0008_1B36);
        Check(6);
        // A command-register write through ECAM is read back through mechanism #1.
        a.mov(__word_ptr[rdi + 4], 0x0006);
        Mechanism1Address(0x8000_0004);
        a.mov(dx, Platform.PciConfigDataPort);
        a.@in(ax, dx);
        a.cmp(ax, 0x0006);
        Check(7);
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.Label(ref fail);
        a.mov(al, bl);
        a.@out(0xF4, al);
        a.hlt();

        var image = new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
        await using var run = await GuestRun.RunAsync(image);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, run.Outcome.ToString());
    }
}
