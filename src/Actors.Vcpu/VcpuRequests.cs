using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu;

/// <summary>The answers to requests about a vcpu's KVM state: the reply, or <see cref="Refused"/>
/// with KVM's error. Called on the vcpu's thread, out of the guest.</summary>
internal static class VcpuRequests
{
    public static IVcpuMessage Registers(IVcpu vcpu, State state)
    {
        try
        {
            return new Registers(vcpu.Id, state, RegisterState.From(vcpu.GetRegisters()), SpecialRegisterState.From(vcpu.GetSpecialRegisters()));
        }
        catch (KvmException e)
        {
            return new Refused(vcpu.Id, nameof(GetRegisters), e.Message);
        }
    }

    public static IVcpuMessage SetRegisters(IVcpu vcpu, SetRegisters set)
    {
        try
        {
            if (set.Registers is { } r) vcpu.SetRegisters(r.ToKvm());
            if (set.Special is { } s) vcpu.SetSpecialRegisters(s.ApplyTo(vcpu.GetSpecialRegisters()));
            return new RegistersSet(vcpu.Id);
        }
        catch (KvmException e)
        {
            return new Refused(vcpu.Id, nameof(SetRegisters), e.Message);
        }
    }

    /// <summary>KVM's local APIC state for the vlapic's GetState (<c>lapic = assisted</c>).</summary>
    public static object ReadKernelLapic(IVcpu vcpu)
    {
        try
        {
            return new VlapicProtocol.StateReply(vcpu.Id, KernelLapicVcpu.ReadState(vcpu));
        }
        catch (Exception e) when (e is KvmException or NotSupportedException)
        {
            return new Refused(vcpu.Id, nameof(VlapicProtocol.ReadKernelLapic), e.Message);
        }
    }

    public static object WriteKernelLapic(IVcpu vcpu, LapicState state)
    {
        try
        {
            KernelLapicVcpu.WriteState(vcpu, state);
            return new VlapicProtocol.StateRestored(vcpu.Id);
        }
        catch (Exception e) when (e is KvmException or NotSupportedException)
        {
            return new Refused(vcpu.Id, nameof(VlapicProtocol.WriteKernelLapic), e.Message);
        }
    }
}
