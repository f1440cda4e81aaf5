using System.Buffers.Binary;
using System.Text;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Tests;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using Xunit.Abstractions;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// Whether this KVM delivers a guest's <c>int3</c> to the guest's own IDT (#BP, vector 3), as a
/// processor does. kvm_pvm's instruction emulator lacks int3 (KVM_EXIT_INTERNAL_ERROR), and a
/// Linux kernel dies at its int3 self-test there: Linux boot tests skip on such a KVM. The probe
/// is a 64-bit guest (entered as <see cref="LongModeImage"/> enters one) that points IDT vector 3
/// at a handler, runs int3, and reports from the handler on an I/O port; run once per process
/// on LibVmm directly (no actors), in milliseconds.
/// </summary>
public static class Int3Probe
{
    public const byte ReportPort = 0x10;
    public const byte Delivered = (byte)'B', NotDelivered = (byte)'N';
    private const ulong CodeAddress = 0x10000, IdtAddress = 0x20000, IdtrAddress = 0x21000;

    private static readonly Lazy<string?> Result = new(Run);

    /// <summary>Why int3 does not reach the guest's handler on this KVM, or null when it does.</summary>
    public static string? Failure => Result.Value;

    public static byte[] Code()
    {
        var a = new Assembler(64);
        var handler = a.CreateLabel();
        // IDT gate 3 (SDM Vol. 3A §6.14.1, 64-bit interrupt gate): offset, CS 0x08, P | type 0xE.
        a.lea(rax, __[handler]);
        a.mov(rdi, IdtAddress + 3 * 16);
        a.mov(__word_ptr[rdi], ax);
        a.mov(__word_ptr[rdi + 2], (ushort)LongModeImage.CodeSelector);
        a.mov(__word_ptr[rdi + 4], 0x8E00);
        a.shr(rax, 16);
        a.mov(__word_ptr[rdi + 6], ax);
        a.shr(rax, 16);
        a.mov(__dword_ptr[rdi + 8], eax);
        a.mov(__dword_ptr[rdi + 12], 0);
        a.mov(rdi, IdtrAddress);
        a.mov(__word_ptr[rdi], 16 * 256 - 1);
        a.mov(rax, IdtAddress);
        a.mov(__qword_ptr[rdi + 2], rax);
        a.lidt(__[rdi]);
        a.int3();
        a.mov(al, NotDelivered); // the handler does not return: reaching this is a wrong delivery
        a.@out(ReportPort, al);
        a.hlt();
        a.Label(ref handler);
        a.mov(al, Delivered);
        a.@out(ReportPort, al);
        a.hlt();
        using var stream = new MemoryStream();
        a.Assemble(new StreamCodeWriter(stream), CodeAddress);
        return stream.ToArray();
    }

    private static string? Run()
    {
        using var kvm = Kvm.Open();
        using var vm = kvm.CreateVm();
        using var memory = VmspaceLayout.Build(2 << 20);
        memory.RegisterWith(vm);
        var boot = new LongModeImage(Code(), CodeAddress, CodeAddress).Load(memory);
        using var vcpu = vm.CreateVcpu(0, CpuidPolicy.ForPlatform(kvm.GetSupportedCpuid()));
        boot.ApplyTo(vcpu);
        for (var i = 0; i < 1000; i++)
        {
            switch (vcpu.Run())
            {
                case VmExit.Intr:
                    continue;
                case VmExit.Io { IsOut: true, Port: ReportPort, Value: Delivered }:
                    return null;
                case VmExit.Io { IsOut: true, Port: ReportPort, Value: NotDelivered }:
                    return "int3 did not reach the guest's #BP handler: execution went on after it";
                case VmExit.InternalError e:
                    return $"KVM cannot run a guest's int3 (KVM_EXIT_INTERNAL_ERROR, suberror {e.Suberror}): its instruction emulator lacks it, as kvm_pvm's does";
                case var other:
                    return $"int3 did not reach the guest's #BP handler: the probe guest exited with {other}";
            }
        }
        return "the int3 probe guest was interrupted 1000 times in a row";
    }
}

/// <summary>A KVM fact whose expectation holds in the KVM box (a full x86 CPU under a real kvm_amd)
/// and is the host KVM's to decide elsewhere: skipped outside the box.</summary>
public sealed class KvmBoxFactAttribute : FactAttribute
{
    public KvmBoxFactAttribute()
    {
        if (KvmRequirement.SkipReason is { } kvm) Skip = kvm;
        else if (!KvmBox.Inside) Skip = $"runs in the KVM box ({KvmBox.Variable}=1) only: elsewhere whether int3 reaches the guest is the host KVM's answer (kvm_pvm's emulator lacks int3)";
    }
}

/// <summary>Whether Linux can run on this KVM: the int3 probe in the KVM box.</summary>
public sealed class LinuxBootGuestTests(ITestOutputHelper output)
{
    /// <summary>The box's CPU is a full x86 one (QEMU TCG) under a real kvm_amd: int3 must reach the guest.</summary>
    [KvmBoxFact]
    public void The_int3_probe_finds_int3_delivered_to_the_guests_handler_in_the_kvm_box()
    {
        var failure = Int3Probe.Failure;
        output.WriteLine($"int3 probe: {failure ?? "delivered to the guest's #BP handler"}");
        Assert.Null(failure);
    }
}
